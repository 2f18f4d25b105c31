"""Learned absolute position embeddings, resampled to other patch grids (DINOv2 style)."""
import math
from typing import Tuple

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


def middle_cls_pos_embed(pos_embed: torch.Tensor, grid_hw: Tuple[int, int], interpolate_offset: float = 0.1) -> torch.Tensor:
    """Position embedding (1, M0+1, D) whose CLS slot is index ``M0 // 2``, for another patch grid.

    The CLS slot is taken out, the square patch grid is bicubically resampled (DINOv2 style), and
    the CLS slot is put back at the new middle ``M // 2``, where :func:`insert_middle_cls` puts it.
    """
    m0 = pos_embed.shape[1] - 1
    c0 = m0 // 2
    cls_pos = pos_embed[:, c0 : c0 + 1]
    patch_pos = torch.cat([pos_embed[:, :c0], pos_embed[:, c0 + 1 :]], dim=1)
    patch_pos = resample_patch_pos_embed(patch_pos, grid_hw, interpolate_offset)
    mid = patch_pos.shape[1] // 2
    return torch.cat([patch_pos[:, :mid], cls_pos, patch_pos[:, mid:]], dim=1)
