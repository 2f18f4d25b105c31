"""Causal depthwise 1-D convolution with the ``causal_conv1d`` package's semantics.

``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k])``, with zeros
before the start of the sequence, so output ``t`` never sees inputs after ``t``.

``causal_conv1d_fn`` dispatches at call time to the package's CUDA kernel when it imports, the
input is on CUDA and the kernel width is one it supports (2 to 4); otherwise to a grouped
``F.conv1d``. ``backend=`` or ``MAMBAVISION_CONV_BACKEND`` (``auto`` | ``cuda`` | ``torch``)
forces one.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import choose_backend, optional_import

BACKEND_ENV = "MAMBAVISION_CONV_BACKEND"
ACTIVATIONS = (None, "silu", "swish")
CUDA_WIDTHS = (2, 3, 4)  # the widths causal_conv1d's kernels are compiled for


def _cuda_conv():
    """The ``causal_conv1d`` package's ``causal_conv1d_fn``, or None when it cannot be imported."""
    return optional_import("causal_conv1d", "causal_conv1d_fn")


def causal_conv1d_available() -> bool:
    """True when the ``causal_conv1d`` CUDA extension can be imported."""
    return _cuda_conv() is not None


def _resolve_backend(backend: Optional[str], x: torch.Tensor, width: int) -> str:
    return choose_backend(
        "causal-conv1d", backend, BACKEND_ENV,
        [("cuda", x.is_cuda and width in CUDA_WIDTHS and causal_conv1d_available(),
          lambda: (f"it needs the causal-conv1d package (importable: {causal_conv1d_available()}), "
                   f"CUDA tensors (x on {x.device}) and a kernel width in {CUDA_WIDTHS} (got {width})"))],
    )


# Custom kernels (mamba-ssm's extension, our Triton kernel) are opaque to torch.compile: a clean graph break.
@torch.compiler.disable
def causal_conv1d_fn(x, weight, bias=None, activation=None, *, backend: Optional[str] = None):
    """Causal depthwise convolution over the last axis.

    Args:
        x: (batch, dim, length).
        weight: (dim, width).
        bias: optional (dim,).
        activation: None, ``"silu"`` or ``"swish"`` (the same function).
        backend: ``"auto"`` (default, or ``$MAMBAVISION_CONV_BACKEND``), ``"cuda"`` or ``"torch"``.

    Returns:
        (batch, dim, length) in ``x``'s dtype; the torch path computes in ``weight``'s dtype,
        as the reference of the ``causal_conv1d`` package does.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, length), got shape {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight must be (dim={dim}, width>=1), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias must be (dim={dim},), got {tuple(bias.shape)}")
    width = weight.shape[1]
    if _resolve_backend(backend, x, width) == "cuda":
        return _cuda_conv()(x, weight, bias, activation=activation)
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)
    out = out[..., : x.shape[-1]]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)
