"""Non-overlapping patch embedding: a strided convolution (computed as one matrix product), flattened to
raster-ordered tokens."""
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..amp import compute_dtype


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D). Any H, W divisible by the patch size is accepted."""

    def __init__(self, img_size=256, patch_size=16, in_chans: int = 3, embed_dim: int = 384, bias: bool = True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
        # A stride-p convolution over p x p patches is one matrix product over the flattened patches. In bf16,
        # cuDNN ran it on a slow implicit-GEMM kernel: 1 ms a call at 128 x 3 x 256 x 256 (H200 trace at
        # 5cfd683), for 19 GFLOP. The weights stay a Conv2d's, so checkpoints load unchanged.
        B, C = x.shape[:2]
        gh, gw = H // ph, W // pw
        x = x.to(compute_dtype(x))  # cast before the patch shuffle: it then moves half the bytes under autocast
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
