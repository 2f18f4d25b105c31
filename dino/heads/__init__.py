"""Projection heads for DINOv2 training."""

from .dino_head import DINOHead

__all__ = ["DINOHead"]
