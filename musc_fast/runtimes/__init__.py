"""Backbone runtimes: run the backbone (with its taps) in ONNX Runtime or OpenVINO instead of torch eager.

Everything after the backbone stays in our engine. ``resolve_runtime`` turns ``"auto"`` into a
concrete runtime; ``RuntimeBackbone`` wraps an exported graph with the backbone's call signature.
"""
from .runtime import RUNTIMES, RuntimeBackbone, RuntimeCacheError, available_runtimes, resolve_runtime

__all__ = ["RUNTIMES", "RuntimeBackbone", "RuntimeCacheError", "available_runtimes", "resolve_runtime"]
