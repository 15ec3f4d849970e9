"""Backbones: registry name -> model returning tapped patch tokens [B, L, C] per layer + cls [B, D]."""
from .base import (
    Backbone,
    BackboneOutput,
    Preprocess,
    available,
    build_backbone,
    register_backbone,
)

__all__ = ["Backbone", "BackboneOutput", "Preprocess", "available", "build_backbone", "register_backbone"]
