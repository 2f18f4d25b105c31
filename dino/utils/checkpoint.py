"""Resumable, atomic, world-size independent training checkpoints.

``<output_dir>/checkpoint.pth`` holds::

    {"model": full (unsharded) SSLMetaArch state dict (student, teacher, loss centres),
     "optimizer": full optimizer state keyed by parameter name, "scaler": GradScaler state or None,
     "iteration": last completed iteration, "world_size": W, "batch_size_per_gpu": B,
     "rng": one RNG state per rank (python, numpy, torch CPU, torch CUDA), "config": yaml text}

Full state dicts keyed by parameter name are what make a checkpoint saved on N processes load on M
(``torch.distributed.checkpoint.state_dict`` gathers FSDP2 shards). The sampler position is
``(iteration + 1) * batch_size_per_gpu`` and is recomputed, not stored.

Saving writes a temporary file in the same directory, fsyncs it and ``os.replace``-s it over the
old file, so a crash during a save leaves the previous checkpoint loadable.

A state with a NaN/inf tensor is never saved (:class:`NonFiniteStateError`). With ``keep > 1`` the
last ``keep`` checkpoints stay as ``checkpoint_<iteration>.pth`` (hard links, so the newest costs no
space beside ``checkpoint.pth``), listed with their largest absolute weight in ``checkpoints.json``;
after a divergence :func:`describe_last_healthy` names the newest one that precedes it.
"""
import json
import logging
import math
import os
import pickle
import random
import re
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from dino import distributed
from dino.atomic import atomic_write

logger = logging.getLogger("dino")

CHECKPOINT_NAME = "checkpoint.pth"
HISTORY_NAME = "checkpoints.json"
# A weight this large means the run has diverged (trained ViT/Mamba weights stay within ~1e2; the
# issue-15 run that ended in NaN had 6e28). Used only to name a healthy checkpoint, never to stop.
DIVERGED_ABS_WEIGHT = 1e4


class NonFiniteStateError(FloatingPointError):
    """A model or optimizer tensor is NaN/inf: the state was not saved."""

try:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
except ImportError:  # a torch build without distributed: plain modules only
    StateDictOptions = None


# -- files ---------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically: tmp file in the same dir, fsync, ``os.replace``."""
    # On any error the old checkpoint stays and the partial file is removed.
    with atomic_write(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Not torch's advice to retry with weights_only=False: that would run the file's code.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise RuntimeError(f"refusing checkpoint {path}: it holds a Python object ({found.group(1)}) beyond "
                               "tensors and plain containers, and unpickling it could run code. Checkpoints written "
                               "by this project never do; re-export the weights as a plain state dict") from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
        raise RuntimeError(f"cannot read checkpoint {path}: not a valid torch checkpoint (corrupt or another format"
                           f"{': ' + detail.group(1).strip() if detail else ''})") from None
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


def resume_path(output_dir: str) -> Optional[str]:
    """``<output_dir>/checkpoint.pth`` if it exists."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    return path if os.path.isfile(path) else None


# -- RNG ---------------------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.random.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- state dicts ---------------------------------------------------------------------------------
def _full_options(**kw):
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded state dict with tensors on CPU: on rank 0 only under FSDP2 (other ranks get ``{}``)."""
    if StateDictOptions is None:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    if StateDictOptions is None:
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def _state_health(model_sd: Dict[str, torch.Tensor], optim_sd: Dict[str, Any]):
    """(name of the first non-finite tensor or None, largest absolute model weight)."""
    max_abs = 0.0
    for k, v in model_sd.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel():
            if not torch.isfinite(v).all():
                return f"model {k}", float("inf")
            max_abs = max(max_abs, float(v.abs().max()))
    for pid, st in (optim_sd.get("state") or {}).items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and v.numel() and not torch.isfinite(v).all():
                return f"optimizer state {k} of {pid}", max_abs
    return None, max_abs


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    iteration: int,
    extra: Optional[Dict[str, Any]] = None,
    keep: int = 1,
) -> None:
    """Collective: every rank calls it; rank 0 writes ``path`` atomically, and keeps the last
    ``keep`` checkpoints as ``checkpoint_<iteration>.pth`` beside it. Raises
    :class:`NonFiniteStateError` (on every rank) instead of saving a non-finite state."""
    if hasattr(model, "flush_pending_state"):
        model.flush_pending_state()
    model_sd = full_model_state_dict(model)
    optim_sd = full_optimizer_state_dict(model, optimizer)
    rng = distributed.all_gather_object(capture_rng_state())
    bad, max_abs = _state_health(model_sd, optim_sd) if distributed.is_main_process() else (None, 0.0)
    bad = distributed.all_gather_object(bad)[0]
    if bad is not None:
        raise NonFiniteStateError(
            f"refusing to save iteration {iteration}: {bad} is not finite; {path} keeps the previous state"
        )
    if distributed.is_main_process():
        ckpt = {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "iteration": int(iteration),
            "world_size": distributed.get_global_size(),
            "rng": rng,
            **(extra or {}),
        }
        atomic_save(ckpt, path)
        _record_history(os.path.dirname(os.path.abspath(path)), path, int(iteration), max_abs, keep)
        logger.info("saved checkpoint %s (iteration %d, max |weight| %.3g)", path, iteration, max_abs)
    distributed.barrier()


# -- history (last K checkpoints) -------------------------------------------------------------------
def _read_history(directory: str) -> list:
    try:
        with open(os.path.join(directory, HISTORY_NAME)) as f:
            entries = json.load(f)
        return [e for e in entries if isinstance(e, dict) and "iteration" in e]
    except (OSError, ValueError, TypeError):
        return []


def _write_history(directory: str, entries: list) -> None:
    path = os.path.join(directory, HISTORY_NAME)
    with atomic_write(path, fsync=True) as tmp, open(tmp, "w") as f:
        json.dump(entries, f, indent=1)


def history_name(iteration: int) -> str:
    return f"checkpoint_{iteration:07d}.pth"


def _link_or_copy(src: str, dst: str) -> None:
    with atomic_write(dst) as tmp:
        os.remove(tmp)  # os.link needs a free name; the random one stays ours
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            import shutil

            shutil.copyfile(src, tmp)


def _record_history(directory: str, path: str, iteration: int, max_abs: float, keep: int) -> None:
    entries = [e for e in _read_history(directory) if e["iteration"] < iteration]
    entry = {"iteration": iteration, "max_abs_weight": max_abs, "file": os.path.basename(path)}
    if keep > 1:
        entry["file"] = history_name(iteration)
        _link_or_copy(path, os.path.join(directory, entry["file"]))
    entries.append(entry)
    for old in entries[:-keep]:
        if old["file"] != os.path.basename(path):
            try:
                os.remove(os.path.join(directory, old["file"]))
            except FileNotFoundError:
                pass
    _write_history(directory, entries[-keep:])


def forget_checkpoints_after(directory: str, iteration: int) -> None:
    """Resuming at ``iteration + 1``: later history entries belong to an abandoned run; drop them."""
    entries = _read_history(directory)
    later = [e for e in entries if e["iteration"] > iteration]
    if not later:
        return
    for e in later:
        if e["file"] != CHECKPOINT_NAME:
            try:
                os.remove(os.path.join(directory, e["file"]))
            except FileNotFoundError:
                pass
    _write_history(directory, [e for e in entries if e["iteration"] <= iteration])
    logger.warning("dropped %d checkpoint(s) after iteration %d (from an abandoned run): iterations %s",
                   len(later), iteration, [e["iteration"] for e in later])


def describe_last_healthy(directory: str, before_iteration: int) -> str:
    """A sentence naming the newest kept checkpoint before ``before_iteration`` whose weights are
    finite and below :data:`DIVERGED_ABS_WEIGHT` (and how to restart from it)."""
    entries = [e for e in _read_history(directory)
               if e["iteration"] < before_iteration and os.path.isfile(os.path.join(directory, e["file"]))]
    if not entries:
        return "no checkpoint was saved before it"
    healthy = [e for e in entries if math.isfinite(e["max_abs_weight"]) and e["max_abs_weight"] <= DIVERGED_ABS_WEIGHT]
    diverged = [e for e in entries if e not in healthy]
    tail = ""
    if diverged:
        tail = (f"; the checkpoints of iterations {[e['iteration'] for e in diverged]} have weights up to "
                f"{max(e['max_abs_weight'] for e in diverged):.3g} and are already diverged")
    if not healthy:
        return (f"every kept checkpoint is already diverged{tail}; raise train.keep_checkpoints or save more often "
                "(train.saveckp_freq)")
    best = healthy[-1]
    path = os.path.join(directory, best["file"])
    if best["file"] == CHECKPOINT_NAME or best is entries[-1]:
        how = f"resume as usual (from {os.path.join(directory, CHECKPOINT_NAME)})"
    else:
        how = f"cp {path} {os.path.join(directory, CHECKPOINT_NAME)}, then resume"
    return (f"the newest checkpoint before the divergence is {path} (iteration {best['iteration']}, "
            f"max |weight| {best['max_abs_weight']:.3g}){tail}. To restart from it: {how}, with a lower "
            "optim.base_lr or a stricter optim.clip_grad")


def load_model_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict into a (possibly FSDP2-sharded) model."""
    if StateDictOptions is None:
        model.load_state_dict(state_dict, strict=strict)
        return
    set_model_state_dict(model, state_dict, options=_full_options(strict=strict))


def _load_training_weights(model: nn.Module, state_dict, path: str) -> None:
    """As :func:`load_model_weights`, but a mismatch is one line naming the tensors, not torch's list."""
    try:
        load_model_weights(model, state_dict)
    except RuntimeError as e:
        text = str(e)
        names = re.findall(r"size mismatch for ([\w.]+)", text)
        missing = re.findall(r'Missing key\(s\) in state_dict: ([^\n]*)', text)
        unexpected = re.findall(r'Unexpected key\(s\) in state_dict: ([^\n]*)', text)
        if not (names or missing or unexpected):
            raise
        parts = []
        if names:
            parts.append(f"{len(names)} tensor(s) of another shape ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
        parts += [f"missing {m[:200]}" for m in missing] + [f"unexpected {u[:200]}" for u in unexpected]
        raise RuntimeError(f"cannot resume from {path}: its weights do not fit this model: {'; '.join(parts)}") from None


# Param-group entries that choose how the optimizer runs, not what it computes.
OPTIMIZER_IMPL_KEYS = ("fused", "foreach")


def _keep_optimizer_impl(optimizer: torch.optim.Optimizer, impl) -> None:
    for g, own in zip(optimizer.param_groups, impl):
        g.update(own)
        if own.get("fused"):  # the fused kernel keeps its step counts on the parameters' device
            for p in g["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(p.device)


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scaler=None, restore_rng: bool = True,
                    check: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Restore ``model``/``optimizer``/``scaler``/RNG from ``path``; returns the checkpoint dict.

    ``check(ckpt)`` runs after reading and before anything is loaded (e.g. architecture checks).
    Every rank reads the file (shared filesystem). RNG states are restored as :func:`saved_rng_state`
    says (the same world size only).
    """
    ckpt = load_file(path)
    for key in ("model", "iteration"):
        if key not in ckpt:
            raise KeyError(f"{path} is not a training checkpoint: missing key {key!r}")
    if check is not None:
        check(ckpt)
    _load_training_weights(model, ckpt["model"], path)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise KeyError(f"{path} has no optimizer state")
        # A saved param group carries its run's kernel choice (fused / foreach); this process keeps its own,
        # so a checkpoint from a CPU or an older run resumes on the fused CUDA kernel, and the other way round.
        impl = [{k: g.get(k) for k in OPTIMIZER_IMPL_KEYS} for g in optimizer.param_groups]
        if StateDictOptions is None:
            optimizer.load_state_dict(ckpt["optimizer"])
        else:
            set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=_full_options())
        _keep_optimizer_impl(optimizer, impl)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    saved_ws = ckpt.get("world_size", 1)
    if saved_ws != distributed.get_global_size():
        logger.warning(
            "resuming a run saved on %d process(es) on %d: weights and optimizer are exact, the data order and "
            "RNG streams continue but differ from an uninterrupted run", saved_ws, distributed.get_global_size(),
        )
    state = saved_rng_state(ckpt)
    if restore_rng and state is not None:
        restore_rng_state(state)
    return ckpt


def saved_rng_state(ckpt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """This rank's saved RNG state, when the checkpoint was written by the same number of processes (the
    one rule: with another world size the streams cannot continue exactly, so every rank keeps its fresh
    seed rather than a mix of restored and fresh streams); else None."""
    rngs = ckpt.get("rng") or []
    rank = distributed.get_global_rank()
    if ckpt.get("world_size", 1) == distributed.get_global_size() and rank < len(rngs):
        return rngs[rank]
    return None


def save_teacher_checkpoint(path: str, model: nn.Module, backbone_config: Optional[Dict[str, Any]] = None) -> None:
    """Collective: ``{"teacher": teacher state dict (keys backbone.*, dino_head.*, ...)}`` for evaluation,
    readable by ``mambavision.load_pretrained``."""
    sd = full_model_state_dict(model.teacher)
    bad = _state_health(sd, {})[0] if distributed.is_main_process() else None
    bad = distributed.all_gather_object(bad)[0]
    if bad is not None:
        raise NonFiniteStateError(f"refusing to save the teacher checkpoint {path}: teacher {bad} is not finite")
    if distributed.is_main_process():
        obj = {"teacher": sd}
        if backbone_config is not None:
            obj["backbone_config"] = backbone_config
        atomic_save(obj, path)
        logger.info("saved teacher checkpoint %s", path)
    distributed.barrier()
