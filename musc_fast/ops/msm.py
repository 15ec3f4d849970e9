"""MSM in torch (SPEC 3): mutual scoring from nearest-neighbour similarities, each unordered pair once.

Rows of Z are unit vectors, so the nearest patch by Euclidean distance is the one of largest dot
product, and min_q ||x - y_q|| = sqrt(max(0, 2 - 2 * max_q <x, y_q>)). One product block
``Z_i Z_j^T`` therefore gives both directions: its row maxima are image i's nearest similarities in
image j, its column maxima image j's in image i. The L x (N-1)L distance matrix of the original is
never formed; the largest temporary is one product block of at most ``block_elems`` values.
"""
from __future__ import annotations

import torch

from .interval import interval_bounds

# Largest product block [L, n*L] formed at once (float32 elements): 2**24 = 64 MiB.
DEFAULT_BLOCK_ELEMS = 1 << 24


def _matmul_dtype(z: torch.Tensor, precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if z.device.type == "cpu":
        # Low-precision matmuls are slower than fp32 on most CPUs and gain nothing here.
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def nearest_similarity_torch(z: torch.Tensor, *, precision: str = "fp32",
                             block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """Nearest-patch similarity for every ordered pair of distinct images.

    Works on query blocks: images I = [i0, i1) against all images J = [i0, N) in one product
    ``Z_I Z_J^T``. Row maxima fill sim[I, :, J]; column maxima fill sim[J, :, I] for the images
    after the block. Each unordered pair is computed once, except the pairs inside a query block
    (both orders, a small overhead that buys larger, faster matmuls).

    Args:
        z: [N, L, C] unit rows (any float dtype).
        precision: matmul inputs in ``"fp32"`` (exact; TF32 stays off) or ``"bf16"``/``"fp16"``
            (tensor cores on GPU, fp32 accumulation).
        block_elems: bound on the elements of one product block (memory knob).
    Returns:
        sim: [N, L, N] float32, ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>`` for j != i and -inf for j == i.
    """
    n, length, c = z.shape
    flat = z.to(_matmul_dtype(z, precision)).reshape(n * length, c)
    sim = torch.empty((n, length, n), dtype=torch.float32, device=z.device)
    per_pair = length * length
    for i0, i1 in _query_blocks(n, per_pair, block_elems):
        b = i1 - i0
        # Partner images J = [i0, N), in chunks so that one block stays within the budget.
        step = max(1, block_elems // (b * per_pair))
        for j0 in range(i0, n, step):
            j1 = min(n, j0 + step)
            block = (flat[i0 * length:i1 * length] @ flat[j0 * length:j1 * length].T).float()
            block = block.view(b, length, j1 - j0, length)
            sim[i0:i1, :, j0:j1] = block.amax(dim=3)  # I's patches -> nearest in each j
            lo = max(j0, i1)  # partners after the query block get their direction from the columns
            if lo < j1:
                sim[lo:j1, :, i0:i1] = block[:, :, lo - j0:].amax(dim=1).permute(1, 2, 0)
    sim.diagonal(dim1=0, dim2=2).fill_(float("-inf"))
    return sim


def _query_blocks(n: int, per_pair: int, block_elems: int, max_block: int = 4):
    """[i0, i1) ranges of query images: up to ``max_block`` images, fewer if one row of blocks
    (the block against all N images) would exceed the budget."""
    b = max(1, min(max_block, block_elems // max(1, n * per_pair)))
    return [(i0, min(n, i0 + b)) for i0 in range(0, n, b)]


def interval_mean_from_similarity(sim: torch.Tensor, k_min: int, k_max: int,
                                  rows_per_chunk: int = 64) -> torch.Tensor:
    """Per patch, the mean of the nearest distances sorted[k_min:k_max] over the other images.

    Only the k_max largest similarities are selected (no full sort); distances are formed from those
    alone, in float64: d = sqrt(max(0, 2 - 2 s)).

    Args:
        sim: [N, L, N] float32 nearest similarities, -inf on the self entries.
    Returns:
        [N, L] float64; NaN everywhere when the interval is empty (compat mode for N <= 4).
    """
    n, length, _ = sim.shape
    if k_max <= k_min:
        return torch.full((n, length), float("nan"), dtype=torch.float64, device=sim.device)
    out = torch.empty((n, length), dtype=torch.float64, device=sim.device)
    for r0 in range(0, n, rows_per_chunk):
        top = sim[r0:r0 + rows_per_chunk].topk(k_max, dim=-1, largest=True, sorted=True).values
        dist = (2.0 - 2.0 * top[..., k_min:k_max].double()).clamp_min_(0.0).sqrt_()
        out[r0:r0 + rows_per_chunk] = dist.mean(dim=-1)
    return out


def mutual_scores_torch(z: torch.Tensor, topmin: tuple[float, float] = (0.0, 0.3), *,
                        compat: bool = False, precision: str = "fp32",
                        block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """Patch anomaly scores of one (r, layer) pass (SPEC 3).

    Args:
        z: [N, L, C] unit rows.
        topmin: interval of the sorted per-image nearest distances to average (SPEC 3.2).
        compat: keep the original's empty interval (NaN) for N <= 4 instead of averaging one image.
    Returns:
        [N, L] float64.
    """
    k_min, k_max = interval_bounds(z.shape[0] - 1, topmin, compat=compat)
    sim = nearest_similarity_torch(z, precision=precision, block_elems=block_elems)
    return interval_mean_from_similarity(sim, k_min, k_max)
