"""The test backbones, all deterministic and offline, in one module.

``tiny_test`` (``TinyBackbone``): for everything above the backbone (CLI, runner, bank); it sees real pixels
(patch means through fixed random projections), so defects in images change the tokens at their patches.
``tiny_nan``: NaN tokens for constant images; ``tiny_slow``: sleeps ``MUSC_FAST_TEST_SLEEP`` s per batch
(a subprocess can be interrupted mid-run); ``raise_if_called``: fails if it runs. ``FakeBackbone``
(``_fake_test``, registered by ``register_fake``): two conv-fed layers for the distributed tests.
Importing this module registers all but ``_fake_test``.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from musc_fast.backbones import Backbone, BackboneOutput, register_backbone
from musc_fast.backbones.base import _REGISTRY, IMAGENET_PREPROCESS


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


# --- backbones that misbehave on purpose (tiny_nan, tiny_slow, raise_if_called) -------------------------
SLEEP_ENV = "MUSC_FAST_TEST_SLEEP"


class NanBackbone(TinyBackbone):
    """``tiny_test`` whose tokens are NaN for images with constant pixels (a stand-in for fp16 overflow)."""

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        out = super().forward(images, need_cls)
        constant = (images.amax(dim=(2, 3)) == images.amin(dim=(2, 3))).all(dim=1)
        for t in out.tokens:
            t[constant] = float("nan")
        return out


class SlowBackbone(TinyBackbone):
    """``tiny_test`` that sleeps before each batch (environment variable ``MUSC_FAST_TEST_SLEEP``, s)."""

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
        return super().forward(images, need_cls)


def _register(name: str, cls: type) -> None:
    if name not in _REGISTRY:
        register_backbone(name)(lambda _n, *, layers, **kw: cls(layers))


_register("tiny_nan", NanBackbone)
_register("tiny_slow", SlowBackbone)


class RaisingBackbone(TinyBackbone):
    """``raise_if_called``: fails the test if the backbone runs (the settings checks must stop a run first)."""

    def forward(self, images, need_cls=True):
        raise AssertionError("the backbone ran although the settings were bad")


@register_backbone("raise_if_called")
def _build_raising(name, *, pretrained, weights, image_size, layers, quick_gelu, compat):
    return RaisingBackbone(layers)


# --- a two-layer conv backbone for the distributed and production tests (_fake_test) ---------------------
FAKE_NAME = "_fake_test"


class FakeBackbone(Backbone):
    """Patch-embedding conv + two small heads: [B, 3, S, S] -> tokens [B, (S/8)^2, C_l] for two layers
    (C = 12 and 10) and a cls token [B, 6]. Weights come from a fixed seed, so every process builds
    the same model."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.name, self.patch_size, self.depth = FAKE_NAME, 8, 2
        self.layers, self.embed_dim, self.cls_dim = (0, 1), 12, 6
        self.preprocess = IMAGENET_PREPROCESS
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.heads = nn.ModuleList([nn.Linear(16, 12), nn.Linear(16, 10)])
        self.cls_head = nn.Linear(16, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        x = torch.tanh(self.embed(images).flatten(2).transpose(1, 2))  # [B, L, 16]
        tokens = [self.heads[0](x), self.heads[1](torch.relu(x))]
        return BackboneOutput(tokens=tokens, cls=self.cls_head(x.mean(dim=1)) if need_cls else None)


def register_fake() -> None:
    """Register ``FakeBackbone`` under ``_fake_test`` (once) so that the CLI can build it by name."""
    if FAKE_NAME not in _REGISTRY:
        register_backbone(FAKE_NAME)(lambda name, **kw: FakeBackbone())
