"""Backbone families; importing a module registers its models."""
from . import mv_hybrid, vit  # noqa: F401
from .backbone import Backbone

__all__ = ["Backbone"]
