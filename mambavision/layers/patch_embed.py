"""Non-overlapping patch embedding: a strided convolution, flattened to raster-ordered tokens."""
from typing import Tuple, Union

import torch
from torch import nn


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
        return self.proj(x).flatten(2).transpose(1, 2)
