"""Open a checkpoint in one call: ``model = mambavision.load_pretrained("teacher_checkpoint.pth")``."""
import dataclasses
import os
import pickle
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .card import BackboneCard
from .registry import create_model, get_entry

# Name components that wrappers insert (DDP, torch.compile, FSDP1, activation checkpointing); the one list
# for loading checkpoints and for the trainer's parameter groups.
WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# Where the backbone lives inside training checkpoints, most specific first.
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.")


def _read(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # weights_only: a checkpoint from the internet must not be able to run code.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. running the file's code: do not pass that on.
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"refused checkpoint {path}: it holds objects other than tensors and plain containers, "
                         f"which are not loaded because unpickling them could run code ({first[:200]}). Re-save its "
                         "state_dict with tensors only, from a source you trust.") from None


def strip_wrappers(key: str) -> str:
    """``key`` without the components wrappers insert, wherever they sit (whole components only, so a
    submodule whose name merely contains "module" is left alone)."""
    return ".".join(c for c in key.split(".") if c not in WRAPPER_COMPONENTS)


def extract_backbone_state_dict(ckpt: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Return ``(backbone_state_dict, backbone_config)`` from any supported checkpoint layout.

    Accepted: a plain backbone state_dict; a DINOv2 teacher checkpoint ``{"teacher": {"backbone.*"}}``
    (the paper's released files); a full training checkpoint ``{"model": {"teacher.backbone.*"}}``;
    ``{"state_dict": ...}``. ``backbone_config`` is what the trainer stored: ``{"name", "kwargs", "card"}``
    (``card``: :meth:`BackboneCard.to_dict`, with the normalisation training used); earlier versions stored
    ``{"name", "kwargs", "normalization"}``; ``{}`` for the paper's release.
    """
    meta = dict(ckpt.get("backbone_config") or {}) if isinstance(ckpt.get("backbone_config"), Mapping) else {}
    sd: Any = ckpt
    for key in ("teacher", "model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            sd = ckpt[key]
            break
    sd = {strip_wrappers(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _BACKBONE_PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub, meta
    return sd, meta


def stored_preprocessing(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing recorded in a ``backbone_config``: the card's fields (mean, std, img_size,
    interpolation), or the ``normalization`` of earlier checkpoints; ``{}`` when none is recorded."""
    if isinstance(meta.get("card"), Mapping):
        card = BackboneCard.from_dict(meta["card"])
        return {k: v for k, v in card.preprocessing().items() if k != "normalization_source"}
    norm = meta.get("normalization") or {}
    if "mean" in norm and "std" in norm:
        return {"mean": tuple(float(v) for v in norm["mean"]), "std": tuple(float(v) for v in norm["std"])}
    return {}


def with_recorded_preprocessing(card: BackboneCard, meta: Mapping[str, Any]) -> BackboneCard:
    """``card`` with the preprocessing a checkpoint's ``backbone_config`` records (unchanged if none)."""
    recorded = stored_preprocessing(meta)
    return dataclasses.replace(card, **recorded, normalization_source="checkpoint") if recorded else card


def checkpoint_card(path: str, name: Optional[str] = None) -> BackboneCard:
    """The card ``load_pretrained(path, name)`` attaches, without building the model: the registry's card of
    the checkpoint's architecture with the preprocessing the checkpoint records."""
    meta = extract_backbone_state_dict(_read(path))[1]
    name = name or meta.get("name")
    if name is None:
        raise ValueError(f"{path} does not record its architecture: pass name=, one of the registered models")
    return with_recorded_preprocessing(get_entry(name).card, meta if meta.get("name", name) == name else {})


def checkpoint_normalization(path: str) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``(mean, std)`` that the trainer recorded in a checkpoint, or None when it records none."""
    recorded = stored_preprocessing(extract_backbone_state_dict(_read(path))[1])
    return (recorded["mean"], recorded["std"]) if recorded else None


def infer_overrides(name: str, state_dict: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> Dict[str, int]:
    """Shape hyper-parameters of a checkpoint that records no configuration (the paper's release), read off
    the weights through the card of a meta-device copy of the model (no weights are allocated, no names
    parsed): embed_dim and patch_size from the patch embedding's kernel, depth from the deepest block held."""
    with torch.device("meta"):
        probe = create_model(name, **given)
    params = dict(probe.named_parameters())
    roles = probe.card.parameter_roles(probe)
    out: Dict[str, int] = {}
    kernel = [k for k, r in roles.items() if r.patch_embed and params[k].ndim == 4 and k in state_dict]
    if kernel:
        w = state_dict[kernel[0]]
        out["embed_dim"], out["patch_size"] = int(w.shape[0]), int(w.shape[-1])
    blocks = [roles[k].layer_id for k in state_dict if k in roles and 1 <= roles[k].layer_id <= probe.n_blocks]
    if blocks:
        out["depth"] = max(blocks)
    return out


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """``load_state_dict`` with one readable error listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if mis_shaped or (strict and (missing or unexpected)):

        def fmt(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:25]) + (f"\n    ... and {len(items) - 25} more" if len(items) > 25 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}"

        raise RuntimeError(
            f"checkpoint does not match {type(model).__name__}:"
            + fmt("missing keys", missing) + fmt("unexpected keys", unexpected) + fmt("shape mismatches", mis_shaped)
        )
    model.load_state_dict(state_dict, strict=strict)


def load_pretrained(
    path: str, name: Optional[str] = None, strict: bool = True, device: Optional[str] = None, **overrides
) -> nn.Module:
    """Build the backbone and load its weights, in eval mode.

    ``name`` and ``overrides`` are as in :func:`create_model`. When the checkpoint was written by
    this project's trainer they default to the stored ``backbone_config`` (name, complete config and
    card); for a checkpoint without one (the paper's release), the shape parameters that can be read
    off the weights (embed_dim, patch_size, depth) are inferred when not given. ``model.card`` carries
    the preprocessing the weights expect: the one the checkpoint records, else the paper's H&E
    statistics (``model.pretrained_cfg`` is its dict form, timm's name).
    """
    state_dict, meta = extract_backbone_state_dict(_read(path))
    name = name or meta.get("name")
    if name is None:
        raise ValueError(f"{path} does not record its architecture: pass name=, one of the registered models")
    entry = get_entry(name)
    saved = meta.get("name")
    kwargs = dict(meta.get("kwargs") or {}) if meta.get("name", name) == name else {}
    try:
        if "card" not in meta or saved != name:  # no complete record: read what the weights tell
            inferred = infer_overrides(name, state_dict, {**kwargs, **overrides})
            for k, v in inferred.items():
                if k in entry.accepted_keys() and entry.default_cfg.get(k) != v:
                    kwargs.setdefault(k, v)
        kwargs.update(overrides)
        model = create_model(name, **kwargs)
        load_state_dict_checked(model, state_dict, strict=strict)
    except (ValueError, KeyError, RuntimeError, AssertionError, TypeError) as err:
        if saved and saved != name:  # the real cause, not a symptom like a shape that does not divide
            raise ValueError(f"{path} holds a {saved!r} backbone, not {name!r}: the architectures differ "
                             f"(pass name={saved!r}, or leave name out). While building {name!r}: {err}") from None
        raise
    # timm's convention: the preprocessing the weights expect travels with the model. The trainer records
    # the normalisation it trained with; released checkpoints keep the card's H&E statistics.
    model.card = with_recorded_preprocessing(model.card, meta)
    if device is not None:
        model.to(device)
    return model.eval()
