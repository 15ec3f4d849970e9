"""The loader's image preprocessing in numpy and PIL (no torch): what ``musc_fast.data.preprocess_image``
computes, bit for bit.

Steps, in the loader's order: turn the image upright by its EXIF orientation (PIL's ``exif_transpose``);
refuse a float ("F") image holding NaN/Inf; convert to 8-bit RGB (16-bit grayscale scaled by 1/257,
every other mode by PIL's ``convert("RGB")``: grayscale repeated, alpha dropped without compositing,
palette colours, CMYK by PIL's formula); squash-resize to S x S with PIL's filter (bilinear or bicubic);
uint8 -> float32 / 255; minus mean, divided by std (float32 throughout, as torch's ToTensor + Normalize).
IEEE float32 division and subtraction are correctly rounded in numpy as in torch, so the result equals
the loader's tensor exactly (tests/test_deploy.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    """An image cannot be preprocessed (unreadable, NaN pixels, wrong array shape); one line."""


@dataclass(frozen=True)
class Preprocessing:
    """How the exported model's input is made (the model folder's JSON, ``preprocessing``).

    Attributes:
        image_size: S, the side of the square input (and of the anomaly map).
        resize: ``"bilinear"`` or ``"bicubic"`` (PIL's antialiased filters; squash, no crop).
        mean, std: per RGB channel, applied after scaling to [0, 1].
    """

    image_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        if d.get("resize") not in INTERPOLATIONS:
            raise ValueError(f"unknown resize mode {d.get('resize')!r}; valid: {', '.join(INTERPOLATIONS)}")
        return cls(int(d["image_size"]), d["resize"], tuple(map(float, d["mean"])), tuple(map(float, d["std"])))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "resize": self.resize, "mean": list(self.mean),
                "std": list(self.std), "color": "RGB", "scale": "1/255", "exif_upright": True,
                "layout": "NCHW float32"}


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (``img`` itself when upright)."""
    img.load()
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except (TypeError, ValueError):  # a broken tag: shown as stored, as the loader does
        value = 1
    if not 2 <= value <= 8:
        return img
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB as the loader converts it (16-bit grayscale scaled, not clipped)."""
    if img.mode in WIDE_INT_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """A PIL image -> [3, S, S] float32, the model's input for one image.

    Raises:
        ImageInputError: a float image with NaN/Inf pixels (PIL would make them black silently).
    """
    img = upright(img)
    if img.mode == "F":
        bad = int((~np.isfinite(np.asarray(img))).sum())
        if bad:
            raise ImageInputError(f"{bad} pixel values of the float image are NaN/Inf")
    s = pp.image_size
    rgb = to_rgb(img).resize((s, s), INTERPOLATIONS[pp.resize])
    x = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(pp.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pp.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def load(path, pp: Preprocessing) -> np.ndarray:
    """An image file -> [3, S, S] float32 (``preprocess``); an unreadable file is one ``ImageInputError``
    line naming it."""
    try:
        with Image.open(path) as img:
            return preprocess(img, pp)
    except ImageInputError as exc:
        raise ImageInputError(f"{path}: {exc}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"{path}: cannot read image ({' '.join(str(exc).split()) or type(exc).__name__})") \
            from None
