"""Backbone families; importing a module registers its models."""
from . import hydra, mv_hybrid, vim, vit  # noqa: F401
from .backbone import Backbone

__all__ = ["Backbone"]
