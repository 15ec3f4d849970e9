"""The backbone contract and the name -> builder registry.

Every backbone is an ``nn.Module`` whose ``forward(images)`` returns the tapped patch tokens of the
requested layers and one image-level token, from ONE forward pass:

    images [B, 3, S, S] float (already preprocessed)
      -> BackboneOutput(tokens=[ [B, L, C] per requested layer, in request order ], cls=[B, D])

L = G * G patches in row-major grid order, CLS/register tokens removed. ``forward(images,
need_cls=False)`` stops after the deepest tapped layer and returns ``cls=None`` (the image token is
defined after the last block, so it needs the full depth).

The built-in backbones (``clip``, ``cnn``, ``dino``) register themselves when ``musc_fast.backbones``'s
``__init__`` imports them, which Python runs before this module is reachable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Normalisation statistics (SPEC 1.2).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images are turned into the backbone's input (SPEC 1.2): squash-resize to S x S with PIL
    (``"bicubic"`` for CLIP, ``"bilinear"`` for DINO), ToTensor, normalise with mean/std."""

    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CLIP_PREPROCESS = Preprocess("bicubic", OPENAI_MEAN, OPENAI_STD)
IMAGENET_PREPROCESS = Preprocess("bilinear", IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class BackboneOutput:
    tokens: list[torch.Tensor]  # one [B, L, C] per requested layer
    cls: torch.Tensor | None  # [B, D]; None when forward ran with need_cls=False


def check_layers(name: str, layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Validate 0-based layer indices against ``depth``; returns them as a tuple of ints."""
    layers = tuple(int(x) for x in layers)
    if not layers or any(x < 0 or x >= depth for x in layers):
        raise ValueError(f"{name}: layers must be 0-based indices in [0, {depth - 1}], got {list(layers)}")
    return layers


class Backbone(nn.Module):
    """Base class. Subclasses set the attributes below in ``__init__`` and implement ``forward``.

    Attributes:
        name: registry name.
        patch_size: p, the stride of one token on the input image (pixels).
        depth: number of tappable layers (valid layer indices are 0..depth-1).
        layers: the requested 0-based layer indices, in request order.
        embed_dim: C, the width of the tapped tokens (the widest one if they differ, see ``tap_dims``).
        cls_dim: D, the width of the image-level token.
        preprocess: the input transform this backbone expects.
        image_size: S, the square input side the backbone was built for.
    """

    name: str = ""
    patch_size: int = 0
    depth: int = 0
    layers: tuple[int, ...] = ()
    embed_dim: int = 0
    cls_dim: int = 0
    preprocess: Preprocess = IMAGENET_PREPROCESS
    image_size: int = 0

    @property
    def tap_dims(self) -> tuple[int, ...]:
        """C of each requested layer's tokens, in request order (a CNN's stages differ in width)."""
        return tuple(self.embed_dim for _ in self.layers)

    def grid_size(self, image_size: int) -> int:
        """G for a square input of side ``image_size`` (the patch conv floors, SPEC 1.2)."""
        return image_size // self.patch_size

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is [B, 3, S, S] with the grid this backbone was built for."""
        g = self.grid_size(self.image_size)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] \
                or images.shape[2] // self.patch_size != g:
            raise ValueError(
                f"{self.name}: images must be [B, 3, S, S] with S // {self.patch_size} == {g} "
                f"(built for image_size={self.image_size}), got {list(images.shape)}"
            )

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError


BuilderFn = Callable[..., Backbone]
_REGISTRY: dict[str, BuilderFn] = {}


def register_backbone(*names: str) -> Callable[[BuilderFn], BuilderFn]:
    """Decorator: register ``builder`` under each of ``names``.

    A builder is called as ``builder(name, *, pretrained, weights, image_size, layers, quick_gelu,
    compat)`` and returns a ``Backbone`` on the CPU in float32 (``build_backbone`` moves and casts it).
    """

    def deco(fn: BuilderFn) -> BuilderFn:
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"backbone {n!r} registered twice")
            _REGISTRY[n] = fn
        return fn

    return deco


def available() -> list[str]:
    """Registered backbone names."""
    return sorted(_REGISTRY)


def build_backbone(
    name: str,
    *,
    pretrained: str | None = None,
    weights: str | None = None,
    image_size: int,
    layers: tuple[int, ...] | list[int],
    quick_gelu: bool | None = None,
    compat: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Build a registered backbone, in eval mode, on ``device`` in ``dtype``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](
        name,
        pretrained=pretrained,
        weights=weights,
        image_size=image_size,
        layers=tuple(int(x) for x in layers),
        quick_gelu=quick_gelu,
        compat=compat,
    )
    return model.to(device=device, dtype=dtype).eval()
