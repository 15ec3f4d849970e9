"""Backbones: registry name -> model returning tapped patch tokens [B, L, C] per layer + cls [B, D]."""
# The built-in backbones: importing them runs their @register_backbone decorators.
from . import clip, cnn, dino  # noqa: F401
from .base import (
    Backbone,
    BackboneOutput,
    Preprocess,
    available,
    build_backbone,
    register_backbone,
)

__all__ = ["Backbone", "BackboneOutput", "Preprocess", "available", "build_backbone", "register_backbone"]
