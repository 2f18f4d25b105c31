"""Backbones for pathology foundation models: MV_Hybrid, ViT_12/24, ViM_EinFFT, Hydra_EinFFT, Hydra_Hybrid.

>>> import mambavision
>>> mambavision.list_models()
>>> model = mambavision.create_model("mv_hybrid")                      # random init, 30.96M params
>>> model = mambavision.load_pretrained("teacher_checkpoint.pth", "mv_hybrid")  # eval mode
>>> model.card                  # preprocessing, eval pooling, accepted overrides; parameter roles, SSM layers
"""
from . import models  # noqa: F401  (registers the backbones)
from .card import HE_MEAN, HE_STD, BackboneCard, SSMLayer
from .pretrained import load_pretrained
from .registry import create_model, get_card, get_entry, list_models
from .transforms import eval_transform

__version__ = "0.1.0"
__all__ = [
    "create_model", "list_models", "load_pretrained", "get_entry", "get_card", "BackboneCard", "SSMLayer",
    "eval_transform", "HE_MEAN", "HE_STD", "__version__",
]
