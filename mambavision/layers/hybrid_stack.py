"""MV_Hybrid's isotropic block layout, shared by MV_Hybrid and the Hydra backbones: an SSM mixer with
EinFFT in the first half, attention with an MLP from ``attention_start(depth)`` on."""
from typing import Callable, Optional

from torch import nn

from .attention import Attention
from .block import MixerBlock
from .drop_path import drop_path_rates
from .einfft import EinFFT
from .mlp import Mlp


class BlockStack(nn.Module):
    """Holds the blocks under ``blocks.blocks.<i>``, the release's key layout."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def __len__(self):
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i]


def attention_start(depth: int) -> int:
    """Index of the first attention block: ``range(d//2 + 1, d)`` for odd d, ``range(d//2, d)`` for even."""
    return depth // 2 + 1 if depth % 2 else depth // 2


def hybrid_blocks(
    embed_dim: int,
    depth: int,
    first_attn: int,
    ssm_mixer: Callable[[], nn.Module],
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    einfft_blocks: int = 4,
    drop_path_rate: float = 0.0,
    layer_scale: Optional[float] = None,
) -> BlockStack:
    """MV_Hybrid's block layout: ``ssm_mixer()`` + EinFFT before ``first_attn``, attention + MLP from it on.

    Shared by MV_Hybrid and the Hydra backbones, which differ only in the SSM mixer.
    """
    dpr = drop_path_rates(drop_path_rate, depth)
    blocks = []
    for i in range(depth):
        if i < first_attn:
            mixer, channel_mixer = ssm_mixer(), EinFFT(embed_dim, num_blocks=einfft_blocks)
        else:
            mixer = Attention(embed_dim, num_heads=num_heads, qkv_bias=qkv_bias)
            channel_mixer = Mlp(embed_dim, int(embed_dim * mlp_ratio))
        blocks.append(MixerBlock(embed_dim, mixer, channel_mixer, drop_path=dpr[i], layer_scale=layer_scale))
    return BlockStack(blocks)
