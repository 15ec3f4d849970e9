"""Pixel transforms, bit-exact with the original's torchvision/open_clip pipelines (SPEC 1.2, 7).

Images: ``to_rgb`` (the original's ``.convert("RGB")``, except for 16-bit images) -> PIL squash-resize
to (S, S) -> ToTensor -> Normalize. The resize is PIL's own (antialiased) filter: bicubic is open_clip's
``preprocess_val`` (CLIP), bilinear is what torchvision ``Resize((S, S))`` does on a PIL image (DINO).
CenterCrop(S) after it is a no-op.

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


# Integer modes wider than 8 bits: 16-bit grayscale PNG/TIFF open as "I;16*" (older Pillow: "I").
WIDE_INT_MODES: frozenset[str] = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, as the original's ``.convert("RGB")`` except for 16-bit images.

    PIL converts "I;16"/"I" to RGB by clipping each value to 255, so a 16-bit image comes out almost
    white. Here those modes are scaled from [0, 65535] to [0, 255] instead (v -> round(v / 257), values
    outside the range clipped first), then grayscale -> RGB. Every other mode keeps PIL's conversion:
    L/1/P -> grey or palette colours, RGBA/LA drop alpha without compositing (as the original), CMYK
    is converted by PIL's formula, float "F" images are read as 0..255 and clipped.
    """
    if img.mode in WIDE_INT_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, size: int, pp: Preprocess) -> torch.Tensor:
    """A PIL image -> the backbone input ``[3, S, S]`` float32 (S = ``size``).

    Same operations in the same order and dtype as torchvision's ToTensor + Normalize, so the
    result is bit-identical to the original's transform.
    """
    rgb = to_rgb(img).resize((size, size), _interpolation(pp.interpolation))
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
