"""DINOv2 training losses: DINO [CLS] loss, iBOT masked-patch loss, KoLeo regulariser."""

from .dino_clstoken_loss import DINOLoss, sinkhorn_knopp
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]
