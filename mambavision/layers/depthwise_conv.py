"""Depthwise 1-D convolution that torch.compile can fuse.

ATen runs a depthwise ``conv1d`` (groups = channels, a (1, k) kernel) on its generic depthwise kernels; cuDNN's
depthwise path does not take non-square kernels. On an H200 the MambaVision mixer's two 4-tap convolutions took
134 us a call forward at (64, 384, 264) in bf16, where moving the bytes takes about 6 us, and 21.6 ms of the
228 ms of kernels in a compiled DINOv2 step (forward, input and weight gradients; trace at 5cfd683). Inductor
treats a convolution as an opaque external kernel. Written as k shifted products, the same function becomes one
fused pointwise kernel (with the activation after it) forward, and pointwise plus reduction kernels backward.

Eager keeps ``F.conv1d``. There, k products are k launches each way, and a fused eager variant was 26% slower at
112 px (dc7624b).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..amp import compute_dtype


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, groups=channels)`` for x (b, c, l + k - 1), already padded; weight (c, 1, k).

    Under torch.compile it is :func:`shifted_products`, elsewhere the convolution itself.
    """
    if torch.compiler.is_compiling():
        return shifted_products(x, weight, bias)
    return F.conv1d(x, weight, bias, groups=weight.shape[0])


def shifted_products(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_j weight[:, 0, j] * x[..., j : j + l] (+ bias), in the dtype a convolution would run in (autocast's)."""
    dt = compute_dtype(x)
    x, w = x.to(dt), weight.to(dt)
    k = w.shape[-1]
    length = x.shape[-1] - k + 1
    y = x[..., :length] * w[:, 0, 0, None]
    for j in range(1, k):
        y = y + x[..., j:j + length] * w[:, 0, j, None]
    return y + bias.to(dt)[:, None] if bias is not None else y
