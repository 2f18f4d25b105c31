"""What a resume may and may not change, checked against the checkpoint before any weight is loaded.

* The architecture (backbone, its shape parameters, the heads) must match: otherwise
  :class:`ResumeMismatchError` lists every differing key in one line.
* Schedule-defining settings (batch size, epochs, epoch length, learning rate, world size) may
  change, but the run then no longer equals an uninterrupted one: a warning says what changed.
"""
import logging
from typing import Any, Dict, List, Tuple

from omegaconf import OmegaConf

from dino.configs.config import ConfigError, as_container

logger = logging.getLogger("dino")

ARCHITECTURE_KEYS = ("student.arch", "student.patch_size", "student.model_kwargs.", "crops.global_crops_size",
                     "dino.head_", "ibot.head_", "ibot.separate_head")
SCHEDULE_KEYS = ("train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH", "optim.epochs", "optim.warmup_epochs",
                 "optim.base_lr", "optim.lr", "optim.min_lr", "optim.scaling_rule")


class ResumeMismatchError(ConfigError):
    """The checkpoint in the output directory was trained with another architecture."""


def _flatten(node, prefix: str = "") -> Dict[str, Any]:
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = node
    return out


def _saved_config(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    text = ckpt.get("config")
    if not isinstance(text, str):
        return {}
    try:
        return _flatten(OmegaConf.to_container(OmegaConf.create(text), resolve=True))
    except Exception:  # an unreadable config text: fall back to the weight shapes when loading
        return {}


def _differences(saved: Dict[str, Any], current: Dict[str, Any], keys: Tuple[str, ...]) -> List[Tuple[str, Any, Any]]:
    names = sorted(k for k in set(saved) | set(current) if any(k == p or k.startswith(p) for p in keys))
    return [(k, saved.get(k), current.get(k)) for k in names if saved.get(k) != current.get(k)]


def check_resume(ckpt: Dict[str, Any], cfg, path: str, world_size: int) -> None:
    """Raise :class:`ResumeMismatchError` for another architecture; warn about changed schedules."""
    saved = _saved_config(ckpt)
    if not saved:
        return
    current = _flatten(as_container(cfg))
    arch = _differences(saved, current, ARCHITECTURE_KEYS)
    if arch:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in arch)
        raise ResumeMismatchError(
            f"cannot resume from {path}: the architecture differs from the checkpoint's ({listed}). "
            "Use the checkpoint's settings, or start afresh with --no-resume or another --output-dir"
        )
    changed = _differences(saved, current, SCHEDULE_KEYS)
    saved_ws = ckpt.get("world_size")
    if saved_ws is not None and saved_ws != world_size:
        changed.append(("world size", saved_ws, world_size))
    if changed:
        logger.warning("resuming %s with changed settings (the run will differ from an uninterrupted one): %s",
                       path, "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed))
