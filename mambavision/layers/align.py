"""Sequence lengths padded for cuBLAS's aligned tensor-core kernels.

A matrix product whose contraction or leading dimension is not a multiple of 8 bf16 elements runs on
cuBLAS's unaligned ``align1`` kernels (sm75-era, several times slower). MV_Hybrid's sequences have 257
tokens at 256 px and 50 at 112 px, so every product that runs along the token axis, or stores it as the
leading dimension, would take them (the H200 profiles in docs/performance.md). Layers that can pad with
zeros without changing a value pad to ``padded_length``.
"""
import torch

ALIGN = 8


def padded_length(length: int, device: torch.device) -> int:
    """``length`` rounded up to a multiple of 8. On the meta device, where the trainer counts model FLOPs
    for its MFU, there is no padding: its zeros are not model FLOPs."""
    return length if device.type == "meta" else -(-length // ALIGN) * ALIGN
