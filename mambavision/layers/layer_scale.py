"""LayerScale (Touvron et al., CaiT 2021): a learned per-channel residual gain."""
import torch
from torch import nn


class LayerScale(nn.Module):
    # Parameter named ``gamma`` as in DINOv2, so its checkpoints load and param groups skip weight decay.
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
