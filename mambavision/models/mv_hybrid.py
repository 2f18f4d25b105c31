"""MV_Hybrid: a flat (isotropic) MambaVision for DINOv2 pretraining (Cho et al., MICCAI COMPAYL 2025).

Blocks in the first half mix tokens with a MambaVision mixer (Hatamizadeh & Kautz, 2024) and
channels with EinFFT (SiMBA); blocks in the second half are ViT blocks (global attention + MLP).
There is no position embedding; the CLS token sits in the middle of the raster-ordered patch
sequence so the one-directional scan lets both halves of the image reach it.

Parameter names match the public release (github.com/chokevin8/MVHybrid) so that its teacher
checkpoints load with ``strict=True``. Its quirks are kept on purpose (docs/deviations.md):
the dt bias is applied twice, the depthwise convolutions have no bias, and the global
truncated-normal init overwrites the Mamba dt init.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..card import SSMLayer, SSMMixer
from ..layers import (
    ChannelFirstLinear, attention_start, channel_first_linear, channels_to_tokens, depthwise_conv1d, hybrid_blocks,
    init_mambavision_weights, insert_middle_cls, tokens_to_channels,
)
from ..layers.align import padded_length
from ..ops import selective_scan_fn
from ..registry import register_model
from .backbone import Backbone


class MambaVisionMixer(SSMMixer, nn.Module):
    """MambaVision's token mixer: a selective scan on one half of the channels, a gated
    convolution branch on the other half, concatenated and projected back.

    Unlike Mamba, both depthwise convolutions are non-causal ('same' padding) and the
    branch ``z`` is concatenated rather than used as a multiplicative gate.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, conv_bias: bool = True):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        half = self.d_inner // 2
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = ChannelFirstLinear(half, self.dt_rank + 2 * d_state, bias=False)  # nn.Linear's keys
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # The release passes conv_bias // 2, which is 0 for the default True: no bias.
        self.conv1d_x = nn.Conv1d(half, half, kernel_size=d_conv, groups=half, bias=bool(conv_bias // 2))
        self.conv1d_z = nn.Conv1d(half, half, kernel_size=d_conv, groups=half, bias=bool(conv_bias // 2))
        # S4D-Real initialisation: A = -(1..N) on every channel (the paper's low-frequency bias).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(half, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(half))

    def ssm_layers(self, prefix: str):
        # delta = softplus(W dt + 2 b): the release adds dt_proj's bias twice.
        yield SSMLayer(prefix, self.A_log, self.D, self.dt_proj.bias, 2, self.x_proj, self.dt_proj.weight,
                       x_proj_dim=1)

    def _conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        # padding='same' as in the release, spelled out (left k-1 // 2, right the rest) because
        # torch warns on every call for even kernels.
        k = conv.kernel_size[0]
        x = F.pad(x, ((k - 1) // 2, k - 1 - (k - 1) // 2))
        return F.silu(depthwise_conv1d(x, conv.weight, conv.bias))  # fusable under compile (layers/depthwise_conv)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Channel-first (b, d, l) from the first projection to the last, the layout of the convolutions and
        # the scan; the projections at either end read the transposed operand in place (layers/channel_first).
        # The sequence is padded with zero tokens to a multiple of 8, so that l, the leading dimension of every
        # channel-first product, is aligned (layers/align). That changes no output: zero tokens project to
        # zeros, which is what the 'same' convolutions pad with, and the scan runs forward in time, so the
        # steps past the end never reach the ones before it.
        L = hidden_states.shape[1]
        pad = padded_length(L, hidden_states.device) - L
        x, z = tokens_to_channels(F.pad(hidden_states, (0, 0, 0, pad)), self.in_proj.weight).chunk(2, dim=1)
        x = self._conv(x, self.conv1d_x)
        z = self._conv(z, self.conv1d_z)
        x_dbl = self.x_proj(x)  # (b, dt_rank + 2 n, l)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        # dt_proj includes its bias, and the scan adds it again as delta_bias (release quirk).
        dt = channel_first_linear(dt, self.dt_proj.weight, self.dt_proj.bias)
        A = -torch.exp(self.A_log.float())
        y = selective_scan_fn(
            x, dt, A, B.contiguous(), C.contiguous(), self.D.float(), z=None,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )
        return channels_to_tokens(torch.cat([y.to(z.dtype), z], dim=1), self.out_proj.weight)[:, :L]


class MVHybrid(Backbone):
    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 24,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        einfft_blocks: int = 4,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale: float = None,
    ):
        super().__init__()
        self._build_stem(img_size, patch_size, in_chans, embed_dim, pos_embed=False)  # no position embedding
        self.blocks = hybrid_blocks(
            embed_dim, depth, attention_start(depth),
            ssm_mixer=lambda: MambaVisionMixer(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand),
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, einfft_blocks=einfft_blocks,
            drop_path_rate=drop_path_rate, layer_scale=layer_scale,
        )
        self.norm = nn.LayerNorm(embed_dim)
        # MambaVision._init_weights: this also overwrites the mixer's dt_proj init (kept on purpose).
        self.apply(init_mambavision_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _add_cls_token(self, x: torch.Tensor, grid_hw: Tuple[int, int]):
        return insert_middle_cls(x, self.cls_token)


register_model(
    "mv_hybrid", MVHybrid, pool="cls+mean", paper_name="MV_Hybrid",
    description="12 MambaVision+EinFFT blocks, then 12 attention+MLP blocks, 384-d (30,963,072 parameters)",
    img_size=256, patch_size=16, embed_dim=384, depth=24, num_heads=6,
)
