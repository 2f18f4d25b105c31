"""Sequence-mixing kernels. Each op dispatches at call time: CUDA extension -> Triton -> pure PyTorch."""
from .causal_conv1d import causal_conv1d_fn
from .selective_scan import selective_scan_fn
from .ssd import mamba_chunk_scan_combined

__all__ = ["selective_scan_fn", "causal_conv1d_fn", "mamba_chunk_scan_combined"]
