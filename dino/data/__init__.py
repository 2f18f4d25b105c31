"""Data side of DINOv2 training: multi-crop augmentation, iBOT block masking, batch collation."""

from .augmentations import (
    HE_MEAN,
    HE_STD,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DataAugmentationDINO,
    GaussianBlur,
)
from .collate import collate_data_and_cast
from .masking import MaskingGenerator

__all__ = [
    "DataAugmentationDINO",
    "GaussianBlur",
    "MaskingGenerator",
    "collate_data_and_cast",
    "HE_MEAN",
    "HE_STD",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
]
