"""Learned absolute position embeddings, resampled to other patch grids (DINOv2 style)."""
import math

import torch
import torch.nn.functional as F


def resample_patch_pos_embed(
    pos: torch.Tensor, grid_hw, interpolate_offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """Bicubically resize a square grid of patch position embeddings (1, N0, D) to ``grid_hw``.

    ``interpolate_offset`` reproduces DINOv2's ``scale_factor=(h + 0.1) / sqrt(N0)`` trick, which
    fixes the sampling positions that its pretrained ViTs were trained with; 0 resizes by size.
    """
    n0, dim = pos.shape[1], pos.shape[2]
    m = int(math.isqrt(n0))
    if m * m != n0:
        raise ValueError(f"position embedding has {n0} patch positions, which is not a square grid")
    h, w = grid_hw
    if (h, w) == (m, m):
        return pos
    grid = pos.reshape(1, m, m, dim).permute(0, 3, 1, 2).float()
    if interpolate_offset:
        kwargs = {"scale_factor": ((h + interpolate_offset) / m, (w + interpolate_offset) / m)}
    else:
        kwargs = {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position embedding resampled to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)
