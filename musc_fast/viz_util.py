"""Heat-map and mask PNGs without matplotlib: a JET colormap in numpy and PIL for writing.

The colormap is the classic piecewise-linear JET (dark blue -> cyan -> yellow -> dark red), the same
shape as OpenCV's COLORMAP_JET that the original uses for its visualisations (SPEC 8.3).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def jet(x: np.ndarray) -> np.ndarray:
    """JET colours of values in [0, 1] (clipped; NaN -> 0).

    Args:
        x: [...] float.
    Returns:
        [..., 3] uint8 RGB.
    """
    v = np.nan_to_num(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0), nan=0.0)
    # each channel is a trapezoid of width 1.5 centred at 3/4 (red), 1/2 (green), 1/4 (blue)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * v - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def normalise(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(amap - vmin) / (vmax - vmin) in float64; a flat range maps to zeros."""
    span = float(vmax) - float(vmin)
    a = np.asarray(amap, dtype=np.float64)
    return np.zeros_like(a) if span <= 0 else (a - vmin) / span


def save_heatmap(amap: np.ndarray, path: str | Path, vmin: float, vmax: float) -> Path:
    """Write one [H, W] anomaly map as a JET PNG, scaled so that vmin is blue and vmax dark red."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(jet(normalise(amap, vmin, vmax))).save(path)
    return path


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write one [H, W] bool mask as a black/white PNG (255 = defective)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(path)
    return path
