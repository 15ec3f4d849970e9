"""Readable float64 references for every algorithm step: the oracle that tests and benchmarks compare to.

Slow on purpose: explicit loops, numpy float64, one SPEC section each. Never used on the hot path.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import cdist  # exact differences, not the ||x||^2+||y||^2-2xy shortcut

from .interval import interval_bounds


def lnamd_reference(tokens: np.ndarray, r: int, eps: float = 1e-5) -> np.ndarray:
    """LNAMD for one layer (SPEC 2), float64.

    Args:
        tokens: [N, L, C] patch tokens of one layer (CLS removed), L = G*G row-major.
        r: odd aggregation degree.
    Returns:
        [N, L, C] float64, unit rows.
    """
    x = np.asarray(tokens, dtype=np.float64)
    n, length, c = x.shape
    g = math.isqrt(length)
    assert g * g == length, "reference needs a square grid"
    out = np.empty_like(x)
    half = (r - 1) // 2
    for i in range(n):
        # One mean and one (biased) variance over the whole (C, G, G) map of the image.
        mu = x[i].mean()
        var = ((x[i] - mu) ** 2).mean()
        y = ((x[i] - mu) / math.sqrt(var + eps)).reshape(g, g, c)
        for row in range(g):
            for col in range(g):
                acc = np.zeros(c)
                for dr in range(-half, half + 1):
                    for dc in range(-half, half + 1):
                        rr, cc = row + dr, col + dc
                        if 0 <= rr < g and 0 <= cc < g:  # zero padding: outside adds nothing
                            acc += y[rr, cc]
                v = acc / (r * r)  # padded zeros count in the divisor (irrelevant after L2)
                out[i, row * g + col] = v / np.linalg.norm(v)
    return out


def nearest_distances_reference(z: np.ndarray) -> np.ndarray:
    """a[i, p, j] = min_q ||Z_i[p] - Z_j[q]||_2 in float64 (SPEC 3.1); a[i, :, i] = +inf (self excluded).

    Args:
        z: [N, L, C] unit rows.
    Returns:
        [N, L, N] float64.
    """
    z = np.asarray(z, dtype=np.float64)
    n, length, _ = z.shape
    a = np.full((n, length, n), np.inf)
    for i in range(n):
        for j in range(i + 1, n):
            d = cdist(z[i], z[j])  # [L, L] Euclidean distances
            a[i, :, j] = d.min(axis=1)
            a[j, :, i] = d.min(axis=0)
    return a


def mutual_scores_reference(z: np.ndarray, topmin: tuple[float, float] = (0.0, 0.3),
                            compat: bool = False) -> np.ndarray:
    """MSM for one (r, layer) pass (SPEC 3): the mean of the order statistics k_min+1..k_max of the
    per-image nearest distances, self excluded.

    Args:
        z: [N, L, C] unit rows.
    Returns:
        [N, L] float64 (all NaN when the interval is empty, which only happens with compat=True).
    """
    n = z.shape[0]
    k_min, k_max = interval_bounds(n - 1, topmin, compat=compat)
    a = nearest_distances_reference(z)
    out = np.empty(a.shape[:2])
    for i in range(n):
        for p in range(a.shape[1]):
            others = np.sort(np.delete(a[i, p], i))
            out[i, p] = others[k_min:k_max].mean() if k_max > k_min else np.nan
    return out


def upsample_reference(patch: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling with align_corners=True (SPEC 4), float64.

    Args:
        patch: [N, G, G].
    Returns:
        [N, size, size] float64.
    """
    patch = np.asarray(patch, dtype=np.float64)
    g = patch.shape[-1]
    # align_corners=True: output pixel t maps to grid coordinate t * (G-1)/(S-1).
    coords = np.arange(size) * ((g - 1) / (size - 1)) if size > 1 else np.zeros(1)
    lo = np.clip(np.floor(coords).astype(int), 0, g - 1)
    hi = np.clip(lo + 1, 0, g - 1)
    w = coords - lo
    out = np.empty((patch.shape[0], size, size))
    for y in range(size):
        for x in range(size):
            top = patch[:, lo[y], lo[x]] * (1 - w[x]) + patch[:, lo[y], hi[x]] * w[x]
            bot = patch[:, hi[y], lo[x]] * (1 - w[x]) + patch[:, hi[y], hi[x]] * w[x]
            out[:, y, x] = top * (1 - w[y]) + bot * w[y]
    return out


def rscin_reference(scores: np.ndarray, gram: np.ndarray, keeps: list[np.ndarray]) -> np.ndarray:
    """RsCIN (SPEC 5.1) given the Gram matrix and, per window, which entries each row keeps.

    Args:
        scores: [N] raw image scores.
        gram: [N, N] class-token similarities (as the original computes them).
        keeps: one [N, N] bool mask per window k (row i keeps its k largest entries).
    Returns:
        [N] float64: mean over windows of the row-stochastic neighbourhood average of the
        min-max normalised scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    s_hat = (s - s.min()) / (s.max() - s.min())
    w = np.asarray(gram, dtype=np.float64)
    out = np.zeros_like(s_hat)
    for keep in keeps:
        for i in range(len(s)):
            row = np.where(keep[i], w[i], 0.0)
            out[i] += (row * s_hat).sum() / row.sum()
    return out / len(keeps)


# ---- production: aligned-parts window (MuSc issue 52) --------------------------------------------------
def mutual_scores_aligned_reference(z: np.ndarray, window: int, topmin: tuple[float, float] = (0.0, 0.3),
                                    compat: bool = False) -> np.ndarray:
    """MSM with the nearest-patch search limited to a window around the same grid position, float64.

    Patch p = (row, col) of image i is compared only with patches q = (row', col') of image j with
    |row - row'| <= window and |col - col'| <= window; window = 0 is the same-position distance.
    Everything else is SPEC 3 (self excluded, mean of the sorted per-image minima [k_min, k_max)).

    Args:
        z: [N, L, C] unit rows, L = G*G row-major.
        window: >= 0 grid steps.
    Returns:
        [N, L] float64.
    """
    z = np.asarray(z, dtype=np.float64)
    n, length, _ = z.shape
    g = math.isqrt(length)
    k_min, k_max = interval_bounds(n - 1, topmin, compat=compat)
    out = np.empty((n, length))
    for i in range(n):
        for p in range(length):
            row, col = divmod(p, g)
            rows = range(max(0, row - window), min(g, row + window + 1))
            cols = range(max(0, col - window), min(g, col + window + 1))
            near = [r * g + c for r in rows for c in cols]
            dists = []
            for j in range(n):
                if j != i:
                    dists.append(np.sqrt(((z[j, near] - z[i, p]) ** 2).sum(axis=1)).min())
            dists = np.sort(dists)
            out[i, p] = dists[k_min:k_max].mean() if k_max > k_min else np.nan
    return out
