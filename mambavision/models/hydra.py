"""Hydra_EinFFT and Hydra_Hybrid: MV_Hybrid's isotropic template with the Hydra mixer.

Hydra (Hwang et al., 2024) is a bidirectional Mamba-2: one SSD scan forward and one on the
flipped sequence share ``x``, ``A`` and the dt bias but have their own ``B``, ``C`` and ``dt``;
both are shifted by one step so neither includes the diagonal, which is instead the learned,
input-dependent ``D + fc_D(x)``. The result is a quasiseparable token-mixing matrix.

The backbones follow MV_Hybrid (PatchEmbed, mask token, CLS token in the middle, pre-LayerNorm
blocks, final LayerNorm, trunc_normal(0.02) on every Linear) with a learned absolute position
embedding resampled to each crop size. ``hydra_einfft`` uses Hydra + EinFFT in every block;
``hydra_hybrid`` switches to attention + MLP blocks from ``attention_start(depth)`` on, exactly as
MV_Hybrid does. The MVHybrid release does not include this code; docs/deviations.md lists what
was inferred. Mixer parameter names follow goombalab/hydra.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..layers import (
    RMSNormGated,
    attention_start,
    hybrid_blocks,
    init_mambavision_weights,
    insert_middle_cls,
    inverse_softplus_dt,
    middle_cls_pos_embed,
)
from ..card import SSMLayer, SSMMixer
from ..ops import mamba_chunk_scan_combined
from ..registry import register_model
from .backbone import Backbone


class HydraMixer(SSMMixer, nn.Module):
    """Hydra token mixer (goombalab/hydra ``Hydra``, non-mem-efficient path), (B, L, d) -> (B, L, d)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 7,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"Hydra: d_inner = expand * d_model = {self.d_inner} is not divisible by headdim={headdim}")
        if d_conv % 2 == 0:
            raise ValueError(f"Hydra: d_conv={d_conv} must be odd for the symmetric ('same') convolution")
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Hydra: ngroups={ngroups} must divide nheads={self.nheads}")
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        bc = 2 * ngroups * d_state  # B and C of one direction
        # in_proj output: [z (d_inner) | x (d_inner) | B_f, C_f, B_b, C_b (2 * bc) | dt_f, dt_b (2 * nheads)]
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * bc + 2 * self.nheads, bias=False)
        conv_dim = self.d_inner + 2 * bc
        # Non-causal depthwise conv: each direction's scan sees a symmetric local window.
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv // 2, bias=True)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor))
        # Hydra initialises A = -1 for every head (A_log = 0), not Mamba-2's U[1, 16].
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False)
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def ssm_layers(self, prefix: str):
        # One scalar A per head, shared by both directions; dt bias added once (dt_bias of the scan).
        yield SSMLayer(prefix, self.A_log, self.D, self.dt_bias, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch = u.shape[0]
        bc = 2 * self.ngroups * self.d_state
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * bc, 2 * self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2)).transpose(1, 2))
        x, BC_f, BC_b = torch.split(xBC, [self.d_inner, bc, bc], dim=-1)

        # Both directions in one scan: the backward one runs on the flipped sequence, stacked on the batch.
        flip = lambda t: torch.flip(t, dims=(1,))  # noqa: E731
        xs = torch.cat([x, flip(x)], dim=0)
        B, C = torch.cat([BC_f, flip(BC_b)], dim=0).chunk(2, dim=-1)
        dt = torch.cat([dt[..., : self.nheads], flip(dt[..., self.nheads :])], dim=0)
        y = mamba_chunk_scan_combined(
            rearrange(xs, "b l (h p) -> b l h p", p=self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            chunk_size=self.chunk_size,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        y = rearrange(y, "b l h p -> b l (h p)")
        # Shift by one step (token t reads the state after t-1): the diagonal comes from D + fc_D only.
        y = F.pad(y[:, :-1], (0, 0, 1, 0))
        diag = F.linear(x, self.fc_D.weight, self.D.to(x.dtype))  # D + fc_D(x), per head
        y = y[:batch] + flip(y[batch:]) + x * repeat(diag, "b l h -> b l (h p)", p=self.headdim)
        return self.out_proj(self.norm(y, z))


class HydraBackbone(Backbone):
    """Hydra_EinFFT (``hybrid=False``) or Hydra_Hybrid (``hybrid=True``). Eval embedding:
    ``cat[CLS, mean patch]``, as MV_Hybrid, whose template these models follow."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 24,
        num_heads: int = 6,
        hybrid: bool = False,
        mlp_ratio: float = 4.0,
        d_state: int = 64,
        d_conv: int = 7,
        expand: int = 2,
        headdim: int = 64,
        chunk_size: int = 256,
        einfft_blocks: int = 4,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale: Optional[float] = None,
        interpolate_offset: float = 0.1,
    ):
        """``num_heads``, ``mlp_ratio`` and ``qkv_bias`` shape the attention blocks (``hybrid=True`` only)."""
        super().__init__()
        self.interpolate_offset = interpolate_offset
        self._build_stem(img_size, patch_size, in_chans, embed_dim, pos_embed=True)
        self.blocks = hybrid_blocks(
            embed_dim, depth, attention_start(depth) if hybrid else depth,
            ssm_mixer=lambda: HydraMixer(
                embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, chunk_size=chunk_size
            ),
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, einfft_blocks=einfft_blocks,
            drop_path_rate=drop_path_rate, layer_scale=layer_scale,
        )
        self.norm = nn.LayerNorm(embed_dim)
        # MV_Hybrid's template init: every Linear (in_proj, fc_D, out_proj too) trunc_normal(0.02).
        self.apply(init_mambavision_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _add_cls_token(self, x: torch.Tensor, grid_hw: Tuple[int, int]):
        x, mid = insert_middle_cls(x, self.cls_token)
        pos = middle_cls_pos_embed(self.pos_embed, grid_hw, self.interpolate_offset)
        return x + pos.to(x.dtype), mid


_HYDRA = dict(img_size=256, patch_size=16, embed_dim=384, depth=24, num_heads=6)
register_model(
    "hydra_einfft", HydraBackbone, pool="cls+mean", paper_name="Hydra_EinFFT",
    description="24 Hydra + EinFFT blocks, middle CLS, abs. pos. embed, 384-d", hybrid=False, **_HYDRA,
)
register_model(
    "hydra_hybrid", HydraBackbone, pool="cls+mean", paper_name="Hydra_Hybrid",
    description="12 Hydra + EinFFT blocks, then 12 attention + MLP blocks, 384-d", hybrid=True, **_HYDRA,
)
