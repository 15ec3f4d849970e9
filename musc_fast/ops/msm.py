"""MSM in torch (SPEC 3): mutual scoring from nearest-neighbour similarities, each unordered pair once.

Rows of Z are unit vectors, so the nearest patch by Euclidean distance is the one of largest dot
product, and min_q ||x - y_q|| = sqrt(max(0, 2 - 2 * max_q <x, y_q>)). One product block
``Z_i Z_j^T`` therefore gives both directions: its row maxima are image i's nearest similarities in
image j, its column maxima image j's in image i. The L x (N-1)L distance matrix of the original is
never formed; the largest temporary is one product block of at most ``block_elems`` values.
"""
from __future__ import annotations

import torch

from ..kernels import bf16_split  # noqa: F401  (re-exported: the kernels' operand split)
from .interval import interval_bounds
from .lnamd import grid_of

# Largest product block [L, n*L] formed at once (float32 elements): 2**24 = 64 MiB.
DEFAULT_BLOCK_ELEMS = 1 << 24


def split_product(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Torch emulation of the split kernel's arithmetic: a @ b_t (fp32) from the bf16 parts of both sides,
    a0 b0 in one fp32 sum and the five cross terms down to 2**-16 relative in another, added at the end.
    Products of bf16 values are exact in fp32, as on the tensor cores. a [M, C], b_t [C, N] -> [M, N]."""
    pa, pb = bf16_split(a).float(), bf16_split(b_t).float()
    lo = sum(pa[x] @ pb[y] for x, y in ((2, 0), (1, 1), (0, 2), (1, 0), (0, 1)))
    return pa[0] @ pb[0] + lo


def _matmul_dtype(z: torch.Tensor, precision: str) -> torch.dtype:
    if precision in ("fp32", "fp32-ieee"):
        return torch.float32
    if z.device.type == "cpu":
        # Low-precision matmuls are slower than fp32 on most CPUs and gain nothing here.
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def nearest_similarity_torch(z: torch.Tensor, *, precision: str = "fp32",
                             block_elems: int = DEFAULT_BLOCK_ELEMS,
                             window: int | None = None) -> torch.Tensor:
    """Nearest-patch similarity for every ordered pair of distinct images.

    Works on query blocks: images I = [i0, i1) against the images after them in large products
    ``Z_I Z_J^T`` (``pair_tasks``). Row maxima fill sim[I, :, J], column maxima sim[J, :, I]. Each
    unordered pair is computed exactly once.

    Args:
        z: [N, L, C] unit rows (any float dtype).
        precision: matmul inputs in ``"fp32"`` (exact; TF32 stays off) or ``"bf16"``/``"fp16"``
            (tensor cores on GPU, fp32 accumulation).
        block_elems: bound on the elements of one product block (memory knob).
        window: aligned-parts search (``MuScConfig.aligned_window``): only patches within +-window grid
            steps (row and column) of the same position count; None = the full search.
    Returns:
        sim: [N, L, N] float32, ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>`` for j != i and -inf for j == i.
    """
    n, length, c = z.shape
    flat = z.to(_matmul_dtype(z, precision)).reshape(n * length, c)
    sim = torch.empty((n, length, n), dtype=torch.float32, device=z.device)
    bias = window_bias(grid_of(length), window, z.device) if window is not None else None
    tasks = pair_tasks(n, length, block_elems)
    work = block_workspace(tasks, length, z.device) if tasks else None
    for task in tasks:
        fill_pair_block(flat, sim, task, length, bias, work)
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


# ---- production: block schedule, cross-set similarity, aligned-parts window --------------------------
# (musc_fast.memory streams with these, musc_fast.distributed shards ``pair_tasks``, musc_fast.bank
# scores new images against stored ones with ``cross_similarity_torch``.)


def pair_tasks(n: int, length: int,
               block_elems: int = DEFAULT_BLOCK_ELEMS) -> list[tuple[int, int, int, int]]:
    """The product blocks of ``nearest_similarity_torch``, in its order: (i0, i1, j0, j1) = query images
    [i0, i1) against partner images [j0, j1), j0 >= i1. Every entry sim[i, :, j] (i != j) is written by
    exactly one task, so tasks can run on different processes and be merged with an elementwise max.

    A query block of b images meets the images after it in large products (one GEMM of b*L rows);
    the pairs inside the block come from one small task per image (i against i+1..i1-1), so no pair
    is computed twice and no image against itself.
    """
    per_pair = length * length
    tasks = []
    for i0, i1 in _query_blocks(n, per_pair, block_elems):
        tasks.extend((i, i + 1, i + 1, i1) for i in range(i0, i1 - 1))  # pairs inside the block
        step = max(1, block_elems // ((i1 - i0) * per_pair))
        tasks.extend((i0, i1, j0, min(n, j0 + step)) for j0 in range(i1, n, step))
    return tasks


def block_workspace(tasks: list[tuple[int, ...]], length: int, device: torch.device | str) -> torch.Tensor:
    """One flat float32 buffer large enough for the biggest product block of ``tasks``.

    Reused by every block of a call: on the CPU, a fresh multi-MB tensor per block goes through mmap and
    page faults (glibc), which measured up to 20x slower than the matmul itself on small C.
    """
    numel = max(((t[1] - t[0]) if len(t) == 4 else 1) * (t[-1] - t[-2]) for t in tasks) * length * length
    return torch.empty(numel, dtype=torch.float32, device=device)


def product_into(a: torch.Tensor, b_t: torch.Tensor, work: torch.Tensor | None) -> torch.Tensor:
    """a @ b_t as float32, written into ``work`` (a flat buffer) when given and the inputs are fp32."""
    if work is None or a.dtype != torch.float32:
        return (a @ b_t).float()
    return torch.mm(a, b_t, out=work[:a.shape[0] * b_t.shape[1]].view(a.shape[0], b_t.shape[1]))


def fill_pair_block(flat: torch.Tensor, sim: torch.Tensor, task: tuple[int, int, int, int], length: int,
                    bias: torch.Tensor | None = None, work: torch.Tensor | None = None) -> None:
    """Compute one product block and write both directions into ``sim``.

    Args:
        flat: [N * L, C] unit rows in the matmul dtype.
        sim: [N, L, N] float32 output, written in place.
        task: (i0, i1, j0, j1) from ``pair_tasks``.
        bias: optional [L, L] float32, 0 inside the aligned window and -inf outside.
        work: optional flat float32 buffer for the block (``block_workspace``).
    """
    i0, i1, j0, j1 = task
    b = i1 - i0
    block = product_into(flat[i0 * length:i1 * length], flat[j0 * length:j1 * length].T, work)
    block = block.view(b, length, j1 - j0, length)
    if bias is not None:
        block += bias[None, :, None, :]  # the window is symmetric: rows and columns both honour it
    sim[i0:i1, :, j0:j1] = block.amax(dim=3)  # I's patches -> nearest in each j
    sim[j0:j1, :, i0:i1] = block.amax(dim=1).permute(1, 2, 0)  # each j's patches -> nearest in I


def window_bias(g: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[L, L] float32: 0 where patches p and q are within ``window`` grid steps in both row and column,
    -inf elsewhere (L = G * G, row-major)."""
    if window < 0:
        raise ValueError(f"aligned window must be >= 0, got {window}")
    pos = torch.arange(g * g, device=device)
    row, col = pos // g, pos % g
    near = ((row[:, None] - row[None, :]).abs() <= window) & ((col[:, None] - col[None, :]).abs() <= window)
    bias = torch.zeros((g * g, g * g), dtype=torch.float32, device=device)
    return bias.masked_fill_(~near, float("-inf"))


def use_window_shifts(window: int, length: int) -> bool:
    """Shifted elementwise products beat a masked full product when the window holds few patches:
    (2w+1)^2 products per patch instead of L (the shifts run at a lower FLOP rate, hence the margin)."""
    w = min(window, grid_of(length) - 1)
    return 4 * (2 * w + 1) ** 2 <= length


def _window_shift_similarity(zq: torch.Tensor, zr: torch.Tensor, window: int, dtype: torch.dtype,
                             block_elems: int) -> torch.Tensor:
    """Aligned search by grid shifts: for each offset (dr, dc) in the window, one batched product per
    grid position. Returns [b, L, m] float32 (max over the window of <zq[p], zr[p + offset]>)."""
    b, length, c = zq.shape
    m = zr.shape[0]
    g = grid_of(length)
    w = min(window, g - 1)
    q = zq.to(dtype).view(b, g, g, c)
    out = torch.empty((b, length, m), dtype=torch.float32, device=zq.device)
    step = max(1, block_elems // max(1, b * length))  # reference images per chunk
    for m0 in range(0, m, step):
        m1 = min(m, m0 + step)
        r = zr[m0:m1].to(dtype).view(m1 - m0, g, g, c)
        best = torch.full((g, g, b, m1 - m0), float("-inf"), dtype=torch.float32, device=zq.device)
        for dr in range(-w, w + 1):
            r0, r1 = max(0, -dr), min(g, g - dr)
            for dc in range(-w, w + 1):
                c0, c1 = max(0, -dc), min(g, g - dc)
                qa = q[:, r0:r1, c0:c1].permute(1, 2, 0, 3).reshape(-1, b, c)
                ra = r[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc].permute(1, 2, 3, 0).reshape(-1, c, m1 - m0)
                prod = torch.bmm(qa, ra).float().view(r1 - r0, c1 - c0, b, m1 - m0)
                best[r0:r1, c0:c1] = torch.maximum(best[r0:r1, c0:c1], prod)
        out[:, :, m0:m1] = best.view(length, b, m1 - m0).permute(1, 0, 2)
    return out


def cross_similarity_torch(zq: torch.Tensor, zr: torch.Tensor, *, precision: str = "fp32",
                           block_elems: int = DEFAULT_BLOCK_ELEMS, window: int | None = None) -> torch.Tensor:
    """Nearest-patch similarity of query images in reference images (one direction, no self exclusion).

    Args:
        zq: [b, L, C] unit rows (queries).
        zr: [m, L, C] unit rows (references, e.g. a bank chunk).
        window: aligned-parts window (see ``nearest_similarity_torch``); None = full search.
    Returns:
        [b, L, m] float32, ``out[i, p, j] = max_q <zq[i, p], zr[j, q]>``.
    """
    b, length, c = zq.shape
    m = zr.shape[0]
    if zr.shape[1:] != (length, c):
        raise ValueError(f"queries are [b, {length}, {c}] but references are {tuple(zr.shape)}")
    dtype = _matmul_dtype(zq, precision)
    if window is not None and use_window_shifts(window, length):
        return _window_shift_similarity(zq, zr, window, dtype, block_elems)
    bias = window_bias(grid_of(length), window, zq.device) if window is not None else None
    q = zq.to(dtype).reshape(b * length, c)
    r = zr.to(dtype).reshape(m * length, c)
    out = torch.empty((b, length, m), dtype=torch.float32, device=zq.device)
    per_pair = length * length
    qs = max(1, min(4, block_elems // max(1, m * per_pair)))
    rs = max(1, block_elems // (qs * per_pair))
    for i0 in range(0, b, qs):
        i1 = min(b, i0 + qs)
        for j0 in range(0, m, rs):
            j1 = min(m, j0 + rs)
            block = (q[i0 * length:i1 * length] @ r[j0 * length:j1 * length].T).float()
            block = block.view(i1 - i0, length, j1 - j0, length)
            if bias is not None:
                block = block + bias[None, :, None, :]
            out[i0:i1, :, j0:j1] = block.amax(dim=3)
    return out


def nearest_similarity_rows(z: torch.Tensor, i0: int, i1: int, *, precision: str = "fp32",
                            block_elems: int = DEFAULT_BLOCK_ELEMS,
                            window: int | None = None) -> torch.Tensor:
    """Rows [i0, i1) of ``nearest_similarity_torch(z)`` without the rest: [i1 - i0, L, N] float32, -inf
    on the self entries. Only row maxima are used (no symmetry), so it costs about twice the FLOPs per
    row; memory is O((i1 - i0) L N) instead of O(N L N)."""
    sim = cross_similarity_torch(z[i0:i1], z, precision=precision, block_elems=block_elems, window=window)
    k = torch.arange(i1 - i0, device=z.device)
    sim[k, :, k + i0] = float("-inf")
    return sim
