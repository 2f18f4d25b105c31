"""Compute precision of the trainer (``compute_precision.*``): TF32 and autocast.

* ``tf32`` (default true): fp32 matrix products and convolutions on CUDA run on TF32 tensor cores,
  as the paper's release sets in its ``train.py`` (``torch.backends.cuda.matmul.allow_tf32``).
* ``autocast_dtype`` (default fp32 = off): ``bf16`` or ``fp16`` runs the student and teacher forward
  passes (backbones and heads) under ``torch.autocast``; the losses, centering and Sinkhorn-Knopp run
  in fp32 on fp32 copies of the head outputs. Master weights, optimiser state and the teacher EMA stay
  fp32. Under FSDP2 ``mixed_precision.param_dtype`` is applied as well (gather dtype); the two compose.

The bf16 mode is ``compute_precision.autocast_dtype=bf16`` (docs/performance.md has its speed and its
loss curve against fp32).
"""
import contextlib

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_tf32(enabled: bool) -> None:
    """Process-wide TF32 switch for CUDA matmuls and cuDNN convolutions (no-op without CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def autocast(dtype_name: str, device: torch.device):
    """Context for the forward passes: ``torch.autocast`` in ``dtype_name``, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES[dtype_name]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("compute_precision.autocast_dtype=fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)
