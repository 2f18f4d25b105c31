"""Autocast helpers that also take meta tensors.

``torch.autocast`` and ``torch.is_autocast_enabled`` reject the meta device, on which the trainer counts
a step's FLOPs (``dino.utils.throughput.count_step_flops``): there autocast is simply off.
"""
import contextlib

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_off(device_type: str):
    """Leave autocast for a region (a no-op context on devices autocast does not know)."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product on ``x`` runs in: the autocast dtype when autocast is on, else x's."""
    t = x.device.type
    if t in _AUTOCAST_DEVICES and torch.is_autocast_enabled(t):
        return torch.get_autocast_dtype(t)
    return x.dtype
