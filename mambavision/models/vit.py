"""DINOv2's ViT-S/16 (Oquab et al., 2023) as the paper's ViT_12 and ViT_24 baselines.

State-dict keys follow DINOv2's ``vision_transformer.py`` (``blocks.<i>.attn.qkv``,
``blocks.<i>.ls1.gamma``, ``pos_embed``, ...), so DINOv2 checkpoints load directly.
"""
from functools import partial
from typing import Tuple

import torch
from torch import nn

from ..layers import Attention, MixerBlock, Mlp, drop_path_rates, resample_patch_pos_embed
from ..registry import register_model
from .backbone import Backbone


class ViTBlock(MixerBlock):
    mixer_attr = "attn"
    channel_mixer_attr = "mlp"


class VisionTransformer(Backbone):
    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-5,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ):
        super().__init__()
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self._build_stem(img_size, patch_size, in_chans, embed_dim, pos_embed=True)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            ViTBlock(
                embed_dim,
                Attention(embed_dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias),
                Mlp(embed_dim, int(embed_dim * mlp_ratio), bias=ffn_bias),
                norm_layer=norm_layer,
                drop_path=dpr[i],
                layer_scale=layer_scale,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, grid_hw: Tuple[int, int]) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = resample_patch_pos_embed(patch_pos, grid_hw, self.interpolate_offset, self.interpolate_antialias)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _add_cls_token(self, x: torch.Tensor, grid_hw: Tuple[int, int]):
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        return x + self.interpolate_pos_encoding(grid_hw).to(x.dtype), 0


_VIT_S16 = dict(img_size=256, patch_size=16, embed_dim=384, num_heads=6, layer_scale=1e-5)
register_model("vit_12", VisionTransformer, pool="cls", paper_name="ViT_12", description="DINOv2 ViT-S/16, 12 blocks", depth=12, **_VIT_S16)
register_model("vit_24", VisionTransformer, pool="cls", paper_name="ViT_24", description="DINOv2 ViT-S/16, 24 blocks", depth=24, **_VIT_S16)
