"""One Gram block per layer for every r: mutual scoring of all LNAMD degrees from one matrix product.

LNAMD's feature for degree r is a box mean of the same LayerNorm'd map X (SPEC 2), normalised:
z_r(p) = B_r x(p) / ||B_r x(p)||. Hence the similarity of patch p of image i and patch q of image j is

    s_r(p, q) = (B_r (X_i X_j^T) B_r^T)(p, q) / (||B_r x_i(p)|| * ||B_r x_j(q)||)

i.e. a 4-D box filter (over p's grid rows/columns and q's grid rows/columns, zero padded) of the ONE
raw Gram block X_i X_j^T, divided by norms of the cheap explicit box means. The r passes of a layer
need one matrix product instead of len(r_list). ``MUSC_FAST_BOXGRAM=0`` switches the pipeline back to
per-r passes.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .interval import interval_bounds
from .lnamd import box_mean, grid_of
from .msm import DEFAULT_BLOCK_ELEMS, _matmul_dtype, _query_blocks, interval_mean_from_similarity


def boxgram_enabled() -> bool:
    """``MUSC_FAST_BOXGRAM`` (default 1): score all r of a layer from one Gram block."""
    value = os.environ.get("MUSC_FAST_BOXGRAM", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"MUSC_FAST_BOXGRAM={value!r} must be 0 or 1")
    return value in ("1", "true", "on")


def _box_sum_along(x: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    """Sum over a window of r consecutive entries centred on each index of ``dim``, zero padded."""
    if r == 1:
        return x
    half = (r - 1) // 2
    pad = [0, 0] * (x.ndim - 1 - dim) + [half, half]
    padded = F.pad(x, pad)
    size = x.shape[dim]
    out = padded.narrow(dim, 0, size).clone()
    for k in range(1, r):
        out += padded.narrow(dim, k, size)
    return out


def box_filter_block(block: torch.Tensor, g: int, r: int) -> torch.Tensor:
    """4-D r x r x r x r box mean of Gram blocks over both patch grids.

    Args:
        block: [b, L, m, L] Gram values <x_i(p), x_j(q)>, L = g * g row-major.
    Returns:
        [b, L, m, L]: <B_r x_i(p), B_r x_j(q)> (box means, padded zeros counted, as LNAMD).
    """
    if r == 1:
        return block
    b, length, m, _ = block.shape
    x = block.reshape(b, g, g, m, g, g)
    for dim in (1, 2, 4, 5):  # p-row, p-col, q-row, q-col: separable
        x = _box_sum_along(x, dim, r)
    return (x / float(r ** 4)).reshape(b, length, m, length)


def nearest_similarity_multi_torch(x: torch.Tensor, r_list: tuple[int, ...] | list[int], *,
                                   precision: str = "fp32",
                                   block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """Nearest-patch similarities of every r from one Gram block per pair of images.

    Args:
        x: [N, L, C] LayerNorm'd tokens of one layer (``layer_norm_chw``), before any box mean.
        r_list: odd degrees.
    Returns:
        sim: [R, N, L, N] float32, ``sim[k, i, p, j] = max_q s_{r_k}(p, q)`` for j != i, -inf for j == i.
    """
    n, length, c = x.shape
    g = grid_of(length)
    x32 = x.float()
    # 1 / ||B_r x(p)||, [R, N, L]
    inv_norms = torch.stack([box_mean(x32, r).norm(dim=-1) for r in r_list]).clamp_min_(1e-12).reciprocal_()
    flat = x32.to(_matmul_dtype(x, precision)).reshape(n * length, c)
    sim = torch.empty((len(r_list), n, length, n), dtype=torch.float32, device=x.device)
    per_pair = length * length
    # A few r-sized temporaries live beside each block: budget them too.
    budget = max(per_pair, block_elems // 3)
    for i0, i1 in _query_blocks(n, per_pair, budget):
        b = i1 - i0
        step = max(1, budget // (b * per_pair))
        for j0 in range(i0, n, step):
            j1 = min(n, j0 + step)
            gram = (flat[i0 * length:i1 * length] @ flat[j0 * length:j1 * length].T).float()
            gram = gram.view(b, length, j1 - j0, length)
            lo = max(j0, i1)
            for k, r in enumerate(r_list):
                s = box_filter_block(gram, g, r)
                s = s * inv_norms[k, i0:i1, :, None, None] * inv_norms[k, j0:j1][None, None]
                sim[k, i0:i1, :, j0:j1] = s.amax(dim=3)
                if lo < j1:
                    sim[k, lo:j1, :, i0:i1] = s[:, :, lo - j0:].amax(dim=1).permute(1, 2, 0)
    sim.diagonal(dim1=1, dim2=3).fill_(float("-inf"))
    return sim


def mutual_scores_multi(x: torch.Tensor, r_list: tuple[int, ...] | list[int],
                        topmin: tuple[float, float] = (0.0, 0.3), *, compat: bool = False,
                        precision: str = "fp32", block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """MSM patch scores of every r of one layer, from one Gram block per image pair.

    Args:
        x: [N, L, C] LayerNorm'd tokens (``layer_norm_chw``).
    Returns:
        [R, N, L] float64, equal to ``mutual_scores(lnamd(tokens, r))`` for each r (within fp32 rounding).
    """
    k_min, k_max = interval_bounds(x.shape[0] - 1, topmin, compat=compat)
    sim = nearest_similarity_multi_torch(x, r_list, precision=precision, block_elems=block_elems)
    return torch.stack([interval_mean_from_similarity(s, k_min, k_max) for s in sim])
