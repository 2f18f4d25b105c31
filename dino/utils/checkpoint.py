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
"""
import logging
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from dino import distributed

logger = logging.getLogger("dino")

CHECKPOINT_NAME = "checkpoint.pth"

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
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically: tmp file in the same dir, fsync, ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave the old checkpoint alone; remove our partial file.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def load_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    iteration: int,
    extra: Optional[Dict[str, Any]] = None,
) -> None:
    """Collective: every rank calls it; rank 0 writes ``path`` atomically."""
    if hasattr(model, "flush_pending_state"):
        model.flush_pending_state()
    model_sd = full_model_state_dict(model)
    optim_sd = full_optimizer_state_dict(model, optimizer)
    rng = distributed.all_gather_object(capture_rng_state())
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
        logger.info("saved checkpoint %s (iteration %d)", path, iteration)
    distributed.barrier()


def load_model_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict into a (possibly FSDP2-sharded) model."""
    if StateDictOptions is None:
        model.load_state_dict(state_dict, strict=strict)
        return
    set_model_state_dict(model, state_dict, options=_full_options(strict=strict))


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scaler=None, restore_rng: bool = True) -> Dict[str, Any]:
    """Restore ``model``/``optimizer``/``scaler``/RNG from ``path``; returns the checkpoint dict.

    Every rank reads the file (shared filesystem). RNG states are restored for ranks that existed
    in the saved run; other ranks keep their fresh seeds (exactness needs the same world size).
    """
    ckpt = load_file(path)
    for key in ("model", "iteration"):
        if key not in ckpt:
            raise KeyError(f"{path} is not a training checkpoint: missing key {key!r}")
    load_model_weights(model, ckpt["model"])
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise KeyError(f"{path} has no optimizer state")
        if StateDictOptions is None:
            optimizer.load_state_dict(ckpt["optimizer"])
        else:
            set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=_full_options())
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rank = distributed.get_global_rank()
    saved_ws = ckpt.get("world_size", 1)
    if saved_ws != distributed.get_global_size():
        logger.warning(
            "resuming a run saved on %d process(es) on %d: weights and optimizer are exact, the data order and "
            "RNG streams continue but differ from an uninterrupted run", saved_ws, distributed.get_global_size(),
        )
    if restore_rng and ckpt.get("rng") and rank < len(ckpt["rng"]):
        restore_rng_state(ckpt["rng"][rank])
    return ckpt


def save_teacher_checkpoint(path: str, model: nn.Module, backbone_config: Optional[Dict[str, Any]] = None) -> None:
    """Collective: ``{"teacher": teacher state dict (keys backbone.*, dino_head.*, ...)}`` for evaluation,
    readable by ``mambavision.load_pretrained``."""
    sd = full_model_state_dict(model.teacher)
    if distributed.is_main_process():
        obj = {"teacher": sd}
        if backbone_config is not None:
            obj["backbone_config"] = backbone_config
        atomic_save(obj, path)
        logger.info("saved teacher checkpoint %s", path)
    distributed.barrier()
