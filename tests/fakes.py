"""A tiny, deterministic, offline backbone for tests of everything above the backbone (CLI, runner, bank).

It sees real pixels (patch means through fixed random projections), so defects in images change the
tokens at their patches; it is registered as ``tiny_test``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from musc_fast.backbones import Backbone, BackboneOutput, register_backbone
from musc_fast.backbones.base import IMAGENET_PREPROCESS


class TinyBackbone(Backbone):
    """patch 8: each layer = a fixed random 1x1 projection of 8x8 patch statistics (+ a nonlinearity)."""

    def __init__(self, layers: tuple[int, ...], width: int = 32, depth: int = 3):
        super().__init__()
        self.name, self.patch_size, self.depth, self.layers = "tiny_test", 8, depth, tuple(layers)
        self.embed_dim, self.cls_dim, self.preprocess = width, width, IMAGENET_PREPROCESS
        gen = torch.Generator().manual_seed(0)
        self.stem = torch.nn.Parameter(torch.randn(width, 6, generator=gen), requires_grad=False)
        self.mix = torch.nn.Parameter(torch.randn(depth, width, width, generator=gen) / width ** 0.5,
                                      requires_grad=False)

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        mean = F.avg_pool2d(images, self.patch_size)
        std = (F.avg_pool2d(images ** 2, self.patch_size) - mean ** 2).clamp_min(0).sqrt()
        x = torch.cat([mean, std], 1).flatten(2).transpose(1, 2) @ self.stem.T  # [B, L, W]
        taps = []
        for d in range(self.depth):
            x = x + torch.tanh(x @ self.mix[d])
            taps.append(x)
        tokens = [taps[i] for i in self.layers]
        return BackboneOutput(tokens=tokens, cls=F.normalize(x.mean(1), dim=-1) if need_cls else None)


@register_backbone("tiny_test")
def _build(name, *, pretrained, weights, image_size, layers, quick_gelu, compat):
    if any(layer >= 3 for layer in layers):
        raise ValueError(f"tiny_test has 3 layers (0..2), got {list(layers)}")
    return TinyBackbone(layers)
