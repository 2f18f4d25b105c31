"""Stochastic depth (Huang et al., 2016), per sample."""
import torch
from torch import nn


def drop_path_rates(drop_path_rate: float, depth: int) -> list:
    """Per-block drop probabilities rising linearly from 0 to ``drop_path_rate`` (timm / DINOv2). Computed on
    the CPU even under a ``torch.device("meta")`` context, so a model can be built on the meta device."""
    return torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Drops the whole residual branch of a sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
