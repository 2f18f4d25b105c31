"""Layers shared by the backbones (timm's ``layers/`` vs ``models/`` split)."""
from .attention import Attention
from .block import MixerBlock
from .channel_first import ChannelFirstLinear, channel_first_linear, channels_to_tokens, tokens_to_channels
from .cls_token import insert_middle_cls
from .depthwise_conv import depthwise_conv1d
from .drop_path import DropPath, drop_path, drop_path_rates
from .einfft import EinFFT
from .hybrid_stack import BlockStack, attention_start, hybrid_blocks
from .init import init_mambavision_weights, inverse_softplus_dt, lecun_normal_
from .layer_scale import LayerScale
from .mlp import Mlp
from .norms import RMSNorm, RMSNormGated
from .patch_embed import PatchEmbed
from .pos_embed import middle_cls_pos_embed, resample_patch_pos_embed

__all__ = [
    "Attention", "MixerBlock", "DropPath", "drop_path", "drop_path_rates", "EinFFT", "LayerScale", "Mlp", "RMSNorm",
    "RMSNormGated", "PatchEmbed", "resample_patch_pos_embed", "middle_cls_pos_embed", "insert_middle_cls",
    "BlockStack", "attention_start", "hybrid_blocks", "init_mambavision_weights", "inverse_softplus_dt", "lecun_normal_",
    "tokens_to_channels", "channels_to_tokens", "channel_first_linear", "ChannelFirstLinear", "depthwise_conv1d",
]
