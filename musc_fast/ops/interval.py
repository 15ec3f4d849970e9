"""Which order statistics of the per-image nearest distances MSM averages (SPEC 3.2)."""
from __future__ import annotations

import math
import warnings


class SmallBatchWarning(UserWarning):
    """The interval [k_min, k_max) would be empty for this N; at least one image is used instead."""


def _to_count(t: float, n_others: int) -> int:
    # < 1: a fraction of N-1, floored; >= 1: an absolute count (the original's rule).
    return int(math.floor(t * n_others)) if t < 1 else int(t)


def interval_bounds(n_others: int, topmin: tuple[float, float] = (0.0, 0.3), *,
                    compat: bool = False) -> tuple[int, int]:
    """(k_min, k_max): MSM averages the sorted distances ``sorted[k_min:k_max]`` of the N-1 other images.

    With the defaults this is the mean of the floor(0.3 * (N-1)) smallest. Reversed bounds are swapped,
    as in the original. For N <= 4 the original interval is empty (its maps are NaN, MuSc issue #41):
    with ``compat=True`` the empty interval is returned (callers produce NaN); by default the interval
    is widened to one image and a ``SmallBatchWarning`` is issued.

    Raises:
        ValueError: fewer than two images (nothing to score against); with ``compat=True`` a single
            image gets the empty interval (NaN), as the original does with current torch.
    """
    if n_others < 1:
        if compat:
            return 0, 0
        raise ValueError(f"mutual scoring needs at least 2 images, got {n_others + 1}")
    lo, hi = (_to_count(float(t), n_others) for t in topmin)
    if lo > hi:
        lo, hi = hi, lo
    lo, hi = min(lo, n_others), min(hi, n_others)
    if hi <= lo and not compat:
        warnings.warn(
            f"topmin {tuple(topmin)} selects no image out of N-1={n_others}; averaging one image "
            "instead (compat=True gives NaN like the original)", SmallBatchWarning, stacklevel=3)
        lo = min(lo, n_others - 1)
        hi = lo + 1
    return lo, hi
