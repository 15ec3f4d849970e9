"""Pixel transforms, bit-exact with the original's torchvision/open_clip pipelines (SPEC 1.2, 7).

Images: ``.convert("RGB")`` -> PIL squash-resize to (S, S) -> ToTensor -> Normalize. The resize is
PIL's own (antialiased) filter: bicubic is open_clip's ``preprocess_val`` (CLIP), bilinear is what
torchvision ``Resize((S, S))`` does on a PIL image (DINO). CenterCrop(S) after it is a no-op.

Masks: bilinear resize to (S, S) -> ToTensor (values in [0, 1]) -> binarise by the data set's rule.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones.base import Preprocess
from .base import MASK_RULES

INTERPOLATIONS: dict[str, int] = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
}


def _interpolation(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; valid: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def preprocess_image(img: Image.Image, size: int, pp: Preprocess) -> torch.Tensor:
    """A PIL image -> the backbone input ``[3, S, S]`` float32 (S = ``size``).

    Same operations in the same order and dtype as torchvision's ToTensor + Normalize, so the
    result is bit-identical to the original's transform.
    """
    rgb = img.convert("RGB").resize((size, size), _interpolation(pp.interpolation))
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.as_tensor(pp.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(pp.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def binarise_mask(img: Image.Image, size: int, rule: str) -> np.ndarray:
    """A PIL mask -> bool ``[S, S]``: bilinear resize, then ``rule`` (see ``MASK_RULES``).

    "gt0" (VisA) converts to 'L' first, as the original does. "eq1" (MVTec/BTAD) reads the mask as
    stored, like the original: 8-bit 'L' masks keep only pixels that stay exactly 255 (= 1.0 after
    ToTensor; edges softened by the resize are dropped), and 1-bit masks, which PIL resizes with
    NEAREST whatever is asked, keep every set pixel. Other modes (RGB, palette, 16-bit), where the
    original would give a multi-channel or unscaled tensor, are converted to 'L' first.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; valid: {', '.join(MASK_RULES)}")
    if rule == "gt0" or img.mode not in ("1", "L"):
        img = img.convert("L")
    arr = np.asarray(img.resize((size, size), Image.BILINEAR))
    if arr.dtype == np.bool_:
        return arr.copy()
    # uint8 v -> v / 255 in float32 is exactly 1.0 only for v = 255 and > 0 only for v > 0.
    return arr == 255 if rule == "eq1" else arr > 0


def load_mask(path: str | Path | None, size: int, rule: str) -> torch.Tensor:
    """The ground-truth mask of one image as bool ``[S, S]``; ``path=None`` gives all False."""
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    with Image.open(path) as img:
        return torch.from_numpy(binarise_mask(img, size, rule))
