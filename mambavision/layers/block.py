"""The pre-norm residual block shared by every isotropic backbone in the zoo.

``x = x + drop_path(ls1(mixer(norm1(x))))`` then ``x = x + drop_path(ls2(channel_mixer(norm2(x))))``.
The token mixer (SSM, attention) and the channel mixer (MLP, EinFFT) are passed in, so MV_Hybrid,
Hydra and ViM blocks differ only in what they are built with. Attribute names follow the
MVHybrid release (``norm1``, ``mixer``, ``norm2``, ``channel_mixer``) so its checkpoints load.
"""
from typing import Callable, Optional

from torch import nn

from .drop_path import DropPath
from .layer_scale import LayerScale


class MixerBlock(nn.Module):
    # Submodule names; DINOv2's ViT block subclasses this with "attn" / "mlp".
    mixer_attr = "mixer"
    channel_mixer_attr = "channel_mixer"

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        channel_mixer: nn.Module,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        setattr(self, self.mixer_attr, mixer)
        self.norm2 = norm_layer(dim)
        setattr(self, self.channel_mixer_attr, channel_mixer)
        # LayerScale is off in the paper's models; Identity keeps the release's state_dict keys.
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        mixer, channel_mixer = getattr(self, self.mixer_attr), getattr(self, self.channel_mixer_attr)
        x = x + self.drop_path(self.ls1(mixer(self.norm1(x))))
        x = x + self.drop_path(self.ls2(channel_mixer(self.norm2(x))))
        return x
