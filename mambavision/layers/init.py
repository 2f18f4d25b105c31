"""Weight initialisations shared by the backbones."""
import math

import torch
from torch import nn


def lecun_normal_(w: torch.Tensor) -> torch.Tensor:
    """Truncated normal with variance 1/fan_in, cut at 2 std (timm's ``lecun_normal_``)."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def init_mambavision_weights(m: nn.Module) -> None:
    """``MambaVision._init_weights``: trunc_normal(0.02) on every Linear with zero bias, LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt bias init: softplus^-1 of step sizes log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
