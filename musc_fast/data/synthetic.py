"""A small procedural anomaly-detection set in MVTec layout (numpy + PIL only), and its reader.

Two categories by default:
* ``texture``: wood-like stripes (fixed orientation, random phase and grain, so normal patches recur
  across images as in MVTec textures). Defects: ``color`` (a tinted blob), ``scratch`` (a thin
  curved line), ``rough`` (a blob where the grain turns and gets finer).
* ``object``: a bottle-top-like disc on a plain background with slight position and colour jitter.
  Defects (inside the disc): ``color``, ``scratch``, ``hole`` (a pale pit through the part).

Blob shapes are smooth (Perlin-style fractal) noise thresholded inside a random ellipse. Every
defect changes exactly the pixels of its mask, and the mask is written as ``<stem>_mask.png``
(mode 'L', 0/255). Each image draws from its own ``numpy`` generator seeded by (seed, category,
folder, index), so the output is byte-identical for the same arguments. Tune visibility and size
with ``DefectParams``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .base import Category, is_normal_type, list_subdirs, require_dir
from .registry import Reader, register_reader
from .tree import read_mvtec_tree

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("texture", "object")


@dataclass(frozen=True)
class DefectParams:
    """Knobs of the defects (fractions are of the whole image, lengths of the side S).

    Attributes:
        area: blob area range, as a fraction of the image (realistic: 0.5-5 %).
        strength: how far defect pixels move towards the defect colour (0 = invisible, 1 = opaque).
        scratch_length: scratch length range, fraction of S.
        scratch_width: scratch width range in pixels at S = 256 (scaled with S).
        roughness: amplitude of the noise that frays the blob outline (0 = a clean ellipse).
    """

    area: tuple[float, float] = (0.006, 0.03)
    strength: float = 0.55
    scratch_length: tuple[float, float] = (0.2, 0.35)
    scratch_width: tuple[float, float] = (4.0, 7.0)
    roughness: float = 0.6


DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "texture": ("color", "rough", "scratch"),
    "object": ("color", "hole", "scratch"),
}


# ------------------------------------------------------------------------------------------------
# noise and shapes

def fractal_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Smooth noise ``[S, S]`` float32 in [0, 1]: bicubic-upsampled random grids, halving amplitude
    and doubling frequency per octave (a cheap Perlin stand-in)."""
    total = np.zeros((size, size), np.float32)
    amp = 1.0
    for o in range(octaves):
        n = cells * 2**o + 1
        grid = rng.random((n, n), dtype=np.float32)
        up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
        total += amp * up
        amp *= 0.5
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def blob_mask(
    rng: np.random.Generator, size: int, allowed: np.ndarray, params: DefectParams
) -> np.ndarray:
    """A frayed elliptical blob ``[S, S]`` bool inside ``allowed``, area in ``params.area``."""
    yy, xx = _coords(size)
    ys, xs = np.nonzero(allowed)
    for _ in range(50):
        area = rng.uniform(*params.area) * size * size
        aspect = rng.uniform(0.5, 2.0)
        a = math.sqrt(area * aspect / math.pi)
        b = math.sqrt(area / (aspect * math.pi))
        k = int(rng.integers(len(ys)))
        cy, cx = float(ys[k]), float(xs[k])
        ang = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)
        v = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        noise = fractal_noise(rng, size, cells=max(2, size // 32), octaves=2)
        mask = (d + params.roughness * (noise - 0.5)) < 1.0
        mask &= allowed
        got = mask.sum() / (size * size)
        if params.area[0] * 0.5 <= got <= params.area[1] * 1.5:
            return mask
    return mask  # rare: the last try, still a valid non-trivial shape in practice


def scratch_mask(
    rng: np.random.Generator, size: int, allowed: np.ndarray, params: DefectParams
) -> np.ndarray:
    """A curved line (quadratic Bezier) of random length and width, ``[S, S]`` bool inside ``allowed``."""
    yy, xx = _coords(size)
    ys, xs = np.nonzero(allowed)
    for _ in range(50):
        k = int(rng.integers(len(ys)))
        p0 = np.array([xs[k], ys[k]], np.float32)
        length = rng.uniform(*params.scratch_length) * size
        ang = rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(ang), math.sin(ang)], np.float32)
        p2 = p0 + length * direction
        bend = rng.uniform(-0.25, 0.25) * length
        p1 = (p0 + p2) / 2 + bend * np.array([-direction[1], direction[0]], np.float32)
        t = np.linspace(0, 1, 4 * int(length) + 2, dtype=np.float32)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # [P, 2] (x, y)
        half = rng.uniform(*params.scratch_width) * size / 256 / 2
        x0, x1 = int(max(pts[:, 0].min() - half - 1, 0)), int(min(pts[:, 0].max() + half + 2, size))
        y0, y1 = int(max(pts[:, 1].min() - half - 1, 0)), int(min(pts[:, 1].max() + half + 2, size))
        mask = np.zeros((size, size), bool)
        if x1 > x0 and y1 > y0:
            bx, by = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
            d2 = (bx[..., None] - pts[:, 0]) ** 2 + (by[..., None] - pts[:, 1]) ** 2
            mask[y0:y1, x0:x1] = d2.min(-1) <= half * half
        mask &= allowed
        if mask.sum() >= 0.6 * length * 2 * half:  # most of the line stayed inside ``allowed``
            return mask
    return mask


# ------------------------------------------------------------------------------------------------
# normal images

def _stripes(size: int, theta: float, freq: float, phase: float, warp: np.ndarray) -> np.ndarray:
    yy, xx = _coords(size)
    u = (xx * math.cos(theta) + yy * math.sin(theta)) / size
    return np.sin(2 * math.pi * freq * (u + 0.06 * warp) + phase)


_WOOD_DARK = np.array([0.36, 0.23, 0.13], np.float32)
_WOOD_LIGHT = np.array([0.82, 0.64, 0.44], np.float32)


def _wood(v: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, 1)[..., None]
    return (_WOOD_DARK + v * (_WOOD_LIGHT - _WOOD_DARK)) * jitter


def render_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal wood-like texture ``[S, S, 3]`` float32 in [0, 1], and where defects may go (all)."""
    theta = math.radians(20) + rng.normal(0, 0.03)
    warp = fractal_noise(rng, size, cells=3)
    rings = _stripes(size, theta, rng.uniform(7.5, 8.5), rng.uniform(0, 2 * math.pi), warp)
    grain = fractal_noise(rng, size, cells=size // 8, octaves=2)
    v = 0.5 + 0.28 * rings + 0.22 * (grain - 0.5)
    img = _wood(v, 1 + rng.normal(0, 0.015, 3).astype(np.float32))
    margin = size // 16
    allowed = np.zeros((size, size), bool)
    allowed[margin:-margin, margin:-margin] = True
    return img, allowed


def render_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A disc on a plain background ``[S, S, 3]`` float32, and the disc interior (defect area)."""
    yy, xx = _coords(size)
    shift = 2 * size / 256
    cx, cy = size / 2 + rng.uniform(-shift, shift), size / 2 + rng.uniform(-shift, shift)
    radius = 0.32 * size * (1 + rng.uniform(-0.02, 0.02))
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius
    bg = np.full((size, size, 3), 0.80, np.float32) * (1 + rng.normal(0, 0.01, 3).astype(np.float32))
    body = np.array([0.22, 0.47, 0.33], np.float32) * (1 + rng.normal(0, 0.03, 3).astype(np.float32))
    shade = (1 - 0.35 * r**2)[..., None]
    ring = np.exp(-(((r - 0.62) * radius / (2.0 * size / 256)) ** 2))[..., None]  # a groove at 0.62 R
    cap = body * shade * (1 - 0.35 * ring) + 0.12 * np.clip(1 - r / 0.35, 0, 1)[..., None]
    alpha = np.clip((1 - r) * radius + 0.5, 0, 1)[..., None]  # anti-aliased rim
    img = alpha * cap + (1 - alpha) * bg
    img += rng.normal(0, 0.008, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), r < 0.85


RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "texture": render_texture,
    "object": render_object,
}


# ------------------------------------------------------------------------------------------------
# defects: each returns (image, mask) and changes exactly the mask's pixels

def _blend(img: np.ndarray, mask: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    out = img.copy()
    out[mask] = (1 - alpha) * img[mask] + alpha * target[mask]
    return out


_TINTS = (np.array([0.75, 0.15, 0.10], np.float32), np.array([0.15, 0.20, 0.70], np.float32))


def _defect_color(rng, img, allowed, params):
    mask = blob_mask(rng, img.shape[0], allowed, params)
    tint = _TINTS[int(rng.integers(len(_TINTS)))] * (1 + rng.normal(0, 0.05, 3).astype(np.float32))
    tint = np.broadcast_to(tint, img.shape)
    return _blend(img, mask, tint, params.strength), mask


def _defect_scratch(rng, img, allowed, params):
    mask = scratch_mask(rng, img.shape[0], allowed, params)
    level = 0.97 if rng.random() < 0.5 else 0.05
    return _blend(img, mask, np.full_like(img, level), min(1.0, params.strength * 1.3)), mask


def _defect_hole(rng, img, allowed, params):
    size = img.shape[0]
    mask = blob_mask(rng, size, allowed, params)
    # A hole through the part shows the pale, unevenly lit surface below it.
    pit = 0.55 + 0.3 * fractal_noise(rng, size, cells=size // 32)
    return _blend(img, mask, np.repeat(pit[..., None], 3, -1), min(1.0, params.strength * 1.5)), mask


def _defect_rough(rng, img, allowed, params):
    size = img.shape[0]
    mask = blob_mask(rng, size, allowed, params)
    warp = fractal_noise(rng, size, cells=6)
    stripes = _stripes(size, math.radians(20 + rng.uniform(60, 120)), rng.uniform(22, 30), 0.0, warp)
    other = _wood(0.5 + 0.45 * stripes, np.ones(3, np.float32))
    return _blend(img, mask, other, min(1.0, params.strength * 1.5)), mask


DEFECTS: dict[str, Callable] = {
    "color": _defect_color,
    "scratch": _defect_scratch,
    "hole": _defect_hole,
    "rough": _defect_rough,
}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _rng(seed: int, category: str, folder: str, index: int) -> np.random.Generator:
    # Stable ints from the names (Python's hash() of str is salted per process).
    key = [zlib.crc32(s.encode()) for s in (category, folder)]
    return np.random.default_rng([seed, *key, index])


def make_image(
    category: str, defect: str | None, seed: int, index: int, size: int = 256,
    params: DefectParams = DefectParams(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: (clean ``[S,S,3]`` uint8, image ``[S,S,3]`` uint8, mask ``[S,S]`` bool).

    ``defect=None`` gives a normal image (image == clean, empty mask). Outside the mask the image
    equals the clean one; inside, the defect has moved the pixels.
    """
    folder = defect or "good"
    rng = _rng(seed, category, folder, index)
    clean, allowed = RENDERERS[category](rng, size)
    if defect is None:
        img, mask = clean, np.zeros((size, size), bool)
    else:
        img, mask = DEFECTS[defect](rng, clean, allowed, params)
    return _to_uint8(clean), _to_uint8(img), mask


def generate_synthetic(
    out_dir: str | Path,
    *,
    categories: Sequence[str] = SYNTHETIC_CATEGORIES,
    n_good: int = 16,
    n_defect: int = 16,
    n_train: int = 4,
    size: int = 256,
    seed: int = 0,
    params: DefectParams = DefectParams(),
) -> Path:
    """Write an MVTec-layout set under ``out_dir`` and return ``out_dir`` as a Path.

    Per category: ``test/good`` (``n_good``), ``test/<defect>`` (``n_defect`` spread over the
    category's defect types, round robin), ``ground_truth/<defect>/<stem>_mask.png`` and
    ``train/good`` (``n_train``, never read by MuSc). Same arguments -> same bytes.
    """
    out = Path(out_dir)
    unknown = [c for c in categories if c not in RENDERERS]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; valid: {', '.join(RENDERERS)}")
    for cat in categories:
        types = DEFECT_TYPES[cat]
        jobs: list[tuple[str, str | None, int]] = [("test", None, i) for i in range(n_good)]
        jobs += [("train", None, 1000 + i) for i in range(n_train)]  # indices disjoint from test
        counts = {t: 0 for t in types}
        for i in range(n_defect):
            t = types[i % len(types)]
            jobs.append(("test", t, counts[t]))
            counts[t] += 1
        for split, defect, idx in jobs:
            _, img, mask = make_image(cat, defect, seed, idx, size, params)
            folder = out / cat / split / (defect or "good")
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{idx % 1000:03d}"
            # Low zlib effort: noisy images compress poorly anyway, and level 6 triples the run time.
            Image.fromarray(img).save(folder / f"{stem}.png", compress_level=1)
            if defect is not None:
                gt = out / cat / "ground_truth" / defect
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{stem}_mask.png", compress_level=1)
    return out


@register_reader("synthetic")
class SyntheticReader(Reader):
    """Reads a tree written by ``generate_synthetic`` (MVTec layout, "good" normal in any case as in every
    MVTec-style reader, "eq1" masks)."""

    layout = "<root>/<category>/test/<type>/*.png as written by generate_synthetic"

    def categories(self, root: Path) -> list[str]:
        return [d for d in list_subdirs(root) if (root / d / "test").is_dir()]

    def load(self, root: Path, category: str) -> Category:
        cat_dir = require_dir(root / category, f"synthetic category {category!r}")
        samples, has_masks = read_mvtec_tree(
            cat_dir, is_normal=is_normal_type, mask_suffixes=("_mask",)  # good/ok/normal, any case, as mvtec
        )
        return Category(category, cat_dir, self.name, samples, has_masks, "eq1")
