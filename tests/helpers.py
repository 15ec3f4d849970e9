"""Random inputs shared by the op tests (fresh draws each run unless a seed is given)."""
from __future__ import annotations

import numpy as np


def unit_rows(n: int, length: int, c: int, rng: np.random.Generator, *,
              structured: bool = True) -> np.ndarray:
    """[N, L, C] float32 unit rows. ``structured`` makes patches of the same grid position similar across
    images (like aligned objects), so nearest neighbours are meaningful and not all near-orthogonal."""
    if structured:
        proto = rng.standard_normal((1, length, c))
        z = proto + 0.6 * rng.standard_normal((n, length, c))
    else:
        z = rng.standard_normal((n, length, c))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return z.astype(np.float32)


def with_duplicates(z: np.ndarray) -> np.ndarray:
    """Copy image 0 into the last image and make every patch of image 1 the same vector (exact ties)."""
    z = z.copy()
    z[-1] = z[0]
    if len(z) > 2:
        z[1] = z[1, :1]
    return z
