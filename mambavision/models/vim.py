"""ViM_EinFFT: Vision Mamba (Zhu et al., 2024; "bimamba v2") with EinFFT channel mixing.

The paper's comparison backbone. Each of the 24 blocks is
``x += DP(VimMixer(RMSNorm(x)))`` then ``x += DP(EinFFT(RMSNorm(x)))``, with the residual stream
kept in fp32 (Vim's ``residual_in_fp32``), a final RMSNorm ``norm_f``, a CLS token in the middle of
the raster-ordered patch sequence and a learned absolute position embedding whose CLS slot is that
middle index. The MVHybrid release builds this model from a Vim fork that was not published; what
is inferred (the EinFFT half, its norm, the resampled position embedding) is listed in
docs/deviations.md. Parameter names follow hustvl/Vim (``layers.<i>.mixer.A_b_log``, ``norm_f``...).
"""
import math
from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from ..card import SSMLayer, SSMMixer
from ..layers import (
    ChannelFirstLinear, DropPath, EinFFT, RMSNorm, channel_first_linear, channels_to_tokens, drop_path_rates,
    insert_middle_cls, inverse_softplus_dt, lecun_normal_, middle_cls_pos_embed, tokens_to_channels,
)
from ..ops import causal_conv1d_fn, selective_scan_fn
from ..registry import register_model
from .backbone import Backbone


class VimMixer(SSMMixer, nn.Module):
    """Bidirectional Mamba mixer (Vim's ``bimamba_type="v2"``).

    One shared ``in_proj`` gives ``x`` and the gate ``z``; a forward branch scans the sequence and a
    backward branch (parameters suffixed ``_b``) scans the flipped sequence, each with its own causal
    depthwise convolution, ``x_proj``, ``dt_proj``, ``A`` and ``D``. The two outputs are averaged
    (Vim's ``if_divide_out=True``) and projected by one shared ``out_proj``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: Optional[int] = None):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for sfx in ("", "_b"):
            setattr(self, "conv1d" + sfx, nn.Conv1d(
                self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True))
            setattr(self, "x_proj" + sfx, ChannelFirstLinear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + sfx, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            # S4D-Real: A = -(1..N) on every channel.
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            self.register_parameter("A" + sfx + "_log", nn.Parameter(torch.log(A)))  # A_log, A_b_log
            self.register_parameter("D" + sfx, nn.Parameter(torch.ones(self.d_inner)))
        with torch.no_grad():
            bound = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner))
            # Vim quirk, kept: only the forward dt bias gets the dt init. The backward one keeps
            # nn.Linear's default weight and its bias is zeroed by the model-wide init (it lacks
            # _no_reinit), so the backward branch starts at delta = softplus(W dt) ~ 0.69.
            nn.init.zeros_(self.dt_proj_b.bias)

    def ssm_layers(self, prefix: str):
        # Both directions add their dt bias once (as the scan's delta_bias).
        yield SSMLayer(prefix, self.A_log, self.D, self.dt_proj.bias, 1, self.x_proj, self.dt_proj.weight,
                       x_proj_dim=1)
        yield SSMLayer(prefix + " (bwd)", self.A_b_log, self.D_b, self.dt_proj_b.bias, 1, self.x_proj_b,
                       self.dt_proj_b.weight, x_proj_dim=1)

    def _branch(self, x, z, conv, x_proj, dt_proj, A_log, D):
        """One direction: causal conv + SiLU, input-dependent (dt, B, C), selective scan gated by z."""
        x = causal_conv1d_fn(x, rearrange(conv.weight, "d 1 k -> d k"), conv.bias, activation="silu")
        # Channel-first throughout (layers/channel_first): no activation is transposed in memory.
        x_dbl = x_proj(x)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        # dt_proj's weight only: its bias enters once, as the scan's delta_bias (unlike MV_Hybrid).
        dt = channel_first_linear(dt, dt_proj.weight)
        A = -torch.exp(A_log.float())
        return selective_scan_fn(
            x, dt, A, B.contiguous(), C.contiguous(), D.float(), z=z.contiguous(),
            delta_bias=dt_proj.bias.float(), delta_softplus=True,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z = tokens_to_channels(hidden_states, self.in_proj.weight).chunk(2, dim=1)
        y_f = self._branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._branch(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        y = (y_f + y_b.flip(-1)) / 2
        return channels_to_tokens(y, self.out_proj.weight)


class VimBlock(nn.Module):
    """``x += DP(mixer(norm(x)))`` then ``x += DP(channel_mixer(norm2(x)))`` on an fp32 residual.

    Vim's fused add+norm keeps the residual stream in fp32 and feeds the mixers in the norm's
    parameter dtype; this unfused form computes the same thing.
    """

    def __init__(self, dim: int, mixer: nn.Module, channel_mixer: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = mixer
        self.norm2 = RMSNorm(dim)
        self.channel_mixer = channel_mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x + self.drop_path(self.mixer(self.norm(x).to(self.norm.weight.dtype)))
        x = x + self.drop_path(self.channel_mixer(self.norm2(x).to(self.norm2.weight.dtype)))
        return x


class VimEinFFT(Backbone):
    """ViM_EinFFT. The eval embedding is the CLS token, as Vim's (and Mamba-Reg's) classifier uses."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        einfft_blocks: int = 4,
        drop_path_rate: float = 0.0,
        interpolate_offset: float = 0.1,
    ):
        """No ``num_heads``: the model has no attention, so the card does not accept that override."""
        super().__init__()
        self.interpolate_offset = interpolate_offset
        self._build_stem(img_size, patch_size, in_chans, embed_dim, pos_embed=True)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList(
            VimBlock(
                embed_dim,
                VimMixer(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand),
                EinFFT(embed_dim, num_blocks=einfft_blocks),
                drop_path=dpr[i],
            )
            for i in range(depth)
        )
        self.norm_f = RMSNorm(embed_dim)
        self._init_weights(depth)

    # Vim's names (layers, norm_f) are the parameters; the contract's names alias them.
    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def norm(self) -> nn.Module:
        return self.norm_f

    def _init_weights(self, depth: int) -> None:
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for layer in self.layers:
            # GPT-2-style rescale of the residual output projection (Mamba's _init_weights).
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(depth)

    def _add_cls_token(self, x: torch.Tensor, grid_hw: Tuple[int, int]):
        x, mid = insert_middle_cls(x, self.cls_token)
        pos = middle_cls_pos_embed(self.pos_embed, grid_hw, self.interpolate_offset)
        return x + pos.to(x.dtype), mid


register_model(
    "vim_einfft", VimEinFFT, pool="cls", paper_name="ViM_EinFFT",
    description="24 bidirectional Mamba (Vim v2) + EinFFT blocks, RMSNorm, middle CLS, abs. pos. embed, 384-d",
    img_size=256, patch_size=16, embed_dim=384, depth=24,
)
