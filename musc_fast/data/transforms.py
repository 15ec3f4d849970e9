"""Pixel transforms, bit-exact with the original's torchvision/open_clip pipelines (SPEC 1.2, 7).

Images: ``to_rgb`` (the original's ``.convert("RGB")``, except for 16-bit images) -> PIL squash-resize
to (S, S) -> ToTensor -> Normalize. The resize is PIL's own (antialiased) filter: bicubic is open_clip's
``preprocess_val`` (CLIP), bilinear is what torchvision ``Resize((S, S))`` does on a PIL image (DINO).
CenterCrop(S) after it is a no-op.

Masks: threshold at the mask's own resolution (``mask_threshold``, see ``binarise_mask``) -> bilinear
resize to (S, S) -> ToTensor (values in [0, 1]) -> binarise by the data set's rule.

EXIF orientation: images and masks are first turned upright (``upright``: PIL's ``exif_transpose``),
as photo viewers show them. Files without an orientation tag (every standard data set) are unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

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


_ORIENTATION = 0x0112  # the EXIF tag
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 degrees


def _orientation(img: Image.Image, *, decode: bool) -> int:
    # A PNG's EXIF chunk may follow the pixels: PIL only sees it after decoding. Without ``decode`` a
    # PNG with no EXIF in its header counts as upright (header-only size checks must stay cheap).
    if not decode and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except (TypeError, ValueError):  # a broken tag: the image is shown as stored
        return 1
    return value if 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (PIL's ``exif_transpose``); ``img`` itself when
    it has no tag or orientation 1. Idempotent: the returned image carries no orientation any more."""
    img.load()
    if _orientation(img, decode=True) == 1:
        return img
    return ImageOps.exif_transpose(img)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` once upright, read from the header (no decode)."""
    w, h = img.size
    return (h, w) if _orientation(img, decode=False) in _SWAPS_SIDES else (w, h)


class NonFiniteImageError(ValueError):
    """A float image holds NaN or Inf pixel values (a ValueError: the loaders report it as an unreadable
    file naming the image, and ``run`` skips and lists it unless ``--strict``)."""


def check_finite_pixels(img: Image.Image) -> None:
    """``NonFiniteImageError`` if a float ("F") image holds NaN/Inf: PIL would turn them into black pixels
    without a word. Integer modes cannot hold them."""
    if img.mode != "F":
        return
    arr = np.asarray(img)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise NonFiniteImageError(f"{bad} of {arr.size} pixel values of the float image are NaN/Inf")


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
    result is bit-identical to the original's transform. The image is first turned upright (``upright``);
    a float image with NaN/Inf pixels raises ``NonFiniteImageError``.
    """
    img = upright(img)
    check_finite_pixels(img)
    rgb = to_rgb(img).resize((size, size), _interpolation(pp.interpolation))
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.as_tensor(pp.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(pp.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def defect_pixels(img: Image.Image, threshold: int) -> np.ndarray:
    """bool [H, W]: the pixels of a mask whose value is > ``threshold`` in any colour channel, at the
    mask's own resolution. Values are on the 0..255 scale: 16-bit masks are scaled by 1/257, palette
    masks use their colours, alpha is ignored; float ("F") masks are compared as stored."""
    if img.mode in WIDE_INT_MODES:
        vals = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) + 128) // 257
    elif img.mode in ("L", "F"):
        vals = np.asarray(img)
    elif img.mode == "LA":
        vals = np.asarray(img)[..., 0]
    else:
        vals = np.asarray(img.convert("RGB")).max(axis=-1)
    return vals > threshold


def binarise_mask(img: Image.Image, size: int, rule: str, threshold: int | None = 0) -> np.ndarray:
    """A PIL mask -> bool ``[S, S]``: threshold, bilinear resize, then ``rule`` (see ``MASK_RULES``).

    The mask is first turned upright (``upright``, as its image). Then ``threshold`` (an int, default 0)
    binarises it at its own resolution, as users mean a mask: a pixel whose value is > threshold in any
    channel (``defect_pixels``) is defect, so 0/1, 0/255, colour (red on black) and anti-aliased masks
    all count their marked pixels. The binary result is resized and binarised by ``rule`` exactly as
    the original does with its 0/255 masks: on a 0/255 mask this step changes nothing, so the standard
    data sets keep the original's numbers bit for bit. "gt0" with threshold 0 skips the step (it already
    keeps every non-zero pixel); 1-bit masks are binary already and skip it too.
    ``threshold=None`` is the original's behaviour for any mask, described next.

    "gt0" (VisA) converts to 'L' first, as the original does. "eq1" (MVTec/BTAD) reads the mask as
    stored, like the original: 8-bit 'L' masks keep only pixels that stay exactly 255 (= 1.0 after
    ToTensor; edges softened by the resize are dropped), and 1-bit masks, which PIL resizes with
    NEAREST whatever is asked, keep every set pixel. Other modes (RGB, palette, 16-bit), where the
    original would give a multi-channel or unscaled tensor, are converted to 'L' first.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; valid: {', '.join(MASK_RULES)}")
    img = upright(img)
    if threshold is not None and img.mode != "1" and not (rule == "gt0" and threshold == 0):
        img = Image.fromarray(np.where(defect_pixels(img, threshold), 255, 0).astype(np.uint8))
    if rule == "gt0" or img.mode not in ("1", "L"):
        img = img.convert("L")
    arr = np.asarray(img.resize((size, size), Image.BILINEAR))
    if arr.dtype == np.bool_:
        return arr.copy()
    # uint8 v -> v / 255 in float32 is exactly 1.0 only for v = 255 and > 0 only for v > 0.
    return arr == 255 if rule == "eq1" else arr > 0


def load_mask(path: str | Path | None, size: int, rule: str, threshold: int | None = 0) -> torch.Tensor:
    """The ground-truth mask of one image as bool ``[S, S]`` (``binarise_mask``); ``path=None`` gives
    all False."""
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    with Image.open(path) as img:
        return torch.from_numpy(binarise_mask(img, size, rule, threshold))
