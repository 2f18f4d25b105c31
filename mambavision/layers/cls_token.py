"""Where the CLS token goes: MV_Hybrid, Vim and Hydra put it in the middle of the patch sequence,
so that a one-directional scan reaches it from both halves of the image."""
from typing import Tuple

import torch


def insert_middle_cls(x: torch.Tensor, cls_token: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Insert ``cls_token`` (1, 1, D) at index ``N // 2`` of the patch tokens (B, N, D)."""
    mid = x.shape[1] // 2
    cls = cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
    return torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1), mid
