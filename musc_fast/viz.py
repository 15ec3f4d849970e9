"""Heat-map PNGs: the original's two bare JET modes and an overlay for people who inspect parts.

- ``single_norm`` (the original's default, SPEC 8.3): each defective image's map min-max normalised
  by itself (this is why normal-looking images show hot spots in the original).
- ``whole_norm``: every image, with one min/max over the category's maps.
- ``overlay``: every image; the map (normalised over the category) blended over the image, the
  ground-truth contour in white, and the image score in the corner.
Each map is written at S x S and at the image's original resolution.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .data.folder import NORMAL_TYPES
from .data.transforms import upright

VIS_MODES = ("single_norm", "whole_norm", "overlay")


def jet(values: np.ndarray) -> np.ndarray:
    """JET colour map: [H, W] values in [0, 1] -> [H, W, 3] uint8 RGB (blue = low, red = high)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)[..., None]
    ramps = np.array([3.0, 2.0, 1.0])  # red, green, blue peak at 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - ramps), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def normalise(m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(m - lo) / (hi - lo), or zeros when the range is empty."""
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        return np.zeros_like(m, dtype=np.float64)
    return (m.astype(np.float64) - lo) / span


def resize_map(m: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float map [S, S] -> [height, width]."""
    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((width, height),
                                                                           Image.BILINEAR))


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask [H, W] (mask minus its 8-connected erosion)."""
    m = mask.astype(bool)
    return m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)


def overlay(image: Image.Image, norm_map: np.ndarray, mask: np.ndarray | None, score: float | None,
            alpha: float = 0.5) -> Image.Image:
    """The map blended over the image at the image's resolution, GT contour and score drawn on top.

    Args:
        image: the original image (any mode, any size).
        norm_map: [S, S] values in [0, 1].
        mask: [h, w] bool ground truth at any resolution, or None.
        score: image score to print in the top-left corner, or None.
    """
    from .data.transforms import to_rgb  # 16-bit images scaled, not clipped, as for scoring

    rgb = to_rgb(image)
    w, h = rgb.size
    heat = jet(resize_map(norm_map, w, h))
    out = (alpha * heat + (1 - alpha) * np.asarray(rgb, dtype=np.float64)).astype(np.uint8)
    if mask is not None and mask.any():
        full = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
        out[contour(full)] = 255
    pic = Image.fromarray(out)
    if score is not None:
        draw = ImageDraw.Draw(pic)
        text = f"{score:.3f}"
        box = draw.textbbox((0, 0), text)
        draw.rectangle((0, 0, box[2] + 6, box[3] + 6), fill=(0, 0, 0))
        draw.text((3, 3), text, fill=(255, 255, 255))
    return pic


def bare(norm_map: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """JET picture of a normalised map, at S x S or resized to ``size`` = (width, height)."""
    m = norm_map if size is None else resize_map(norm_map, *size)
    return Image.fromarray(jet(m))


def maps_to_draw(mode: str, defect_types: list[str], labels: list[int]) -> list[int]:
    """Which images a mode writes: ``single_norm`` only defective ones (as the original), else all."""
    if mode not in VIS_MODES:
        raise ValueError(f"unknown vis mode {mode!r}; valid modes: {', '.join(VIS_MODES)}")
    if mode != "single_norm":
        return list(range(len(labels)))
    return [i for i, (d, y) in enumerate(zip(defect_types, labels))
            if y != 0 and d.lower() not in NORMAL_TYPES]  # the original skips these folders


def render(mode: str, maps: np.ndarray, index: int, image_path: Path, mask: np.ndarray | None,
           score: float | None, whole_range: tuple[float, float]) -> tuple[Image.Image, Image.Image]:
    """The (S x S, original-resolution) pictures of image ``index`` for ``mode``.

    Args:
        maps: [N, S, S] anomaly maps of the category.
        whole_range: (min, max) over all the category's maps (``whole_norm`` and ``overlay``).
    """
    m = maps[index]
    lo, hi = (float(m.min()), float(m.max())) if mode == "single_norm" else whole_range
    nm = normalise(m, lo, hi)
    with Image.open(image_path) as raw:
        im = upright(raw)  # as it was scored (EXIF orientation)
        full_size = im.size
        if mode == "overlay":
            s = maps.shape[-1]
            small = overlay(im.resize((s, s), Image.BICUBIC), nm, mask, score)
            return small, overlay(im, nm, mask, score)
    return bare(nm), bare(nm, full_size)
