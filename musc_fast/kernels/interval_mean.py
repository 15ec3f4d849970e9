"""Interval mean of the nearest distances (MSM step 2, SPEC 3.2) as a Triton kernel, without a sort.

What one program computes. ``BLOCK_R`` patches (rows of ``sim``), each with all N similarities held in
registers (``BLOCK_C`` = next power of two >= N; padding and the self entry read as -inf). Distances
d = sqrt(max(0, 2 - 2 s)) fall as s rises, so the ascending distances ``sorted[k_min:k_max]`` are the
distances of the similarities of descending ranks k_min .. k_max-1. The program walks down the
distinct similarity values: each step takes the largest value below the previous one (a row max),
counts how many entries equal it, and so knows the ranks ``[taken, taken + count)`` it occupies; the
overlap of those ranks with ``[k_min, k_max)`` times the value's distance goes into the sum. Exact ties
(equal similarities, e.g. from duplicate images) are one step with count > 1, so each tied value is
weighted by exactly as many ranks as it fills, as with a sort. k_max steps (with ties the last ones add
nothing), each a row max and a row count over N registers; no sort, no top-k buffer. Distances and
sums are float64, from the fp32 maxima, as in the torch path.

Several passes (e.g. the 12 (r, layer) maps) can be summed in one launch, and the result can be added
to a running [N, L] sum (``accumulate``), so the pipeline's average over passes needs no [P, N, L]
intermediate.

Memory traffic. One read of ``sim`` (N L N fp32) and one write of the [N, L] result; the torch path's
top-k values tensor ([N, L, k_max], twice over with the float64 copy) is never formed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, next_pow2

INTERPRETED = interpreting()


@triton.jit
def _interval_mean_kernel(
    sim_ptr, out_ptr, n_rows, n_cols, n_pass, pass_stride, k_min, k_max, width,
    ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """sim [P, n_rows, n_cols] fp32 (n_rows = N*L, n_cols = N, pass_stride = n_rows*n_cols);
    out [n_rows] fp64 or fp32; width = k_max - k_min as a float."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    total = tl.zeros([BLOCK_R], dtype=tl.float64)
    base = sim_ptr
    for _p in range(n_pass):
        x = tl.load(base + offs, mask=mask, other=float("-inf"))
        base += pass_stride  # host int: 64-bit when a pass exceeds 2**31 values
        below = tl.full([BLOCK_R], float("inf"), tl.float32)  # the value taken by the previous step
        taken = tl.zeros([BLOCK_R], dtype=tl.int32)  # ranks filled so far (descending similarity)
        acc = tl.zeros([BLOCK_R], dtype=tl.float64)
        for _ in range(k_max):
            s = tl.max(tl.where(x < below[:, None], x, float("-inf")), axis=1)
            count = tl.sum((x == s[:, None]).to(tl.int32), axis=1)
            # Ranks [taken, taken + count) hold s; the part inside [k_min, k_max) is averaged.
            overlap = tl.minimum(taken + count, k_max) - tl.maximum(taken, k_min)
            # Rows already past k_max may reach s = -inf: use a finite stand-in (its weight is 0).
            s_used = tl.where(overlap > 0, s, 0.0)
            d = tl.sqrt(tl.maximum(2.0 - 2.0 * s_used.to(tl.float64), 0.0))
            acc += tl.maximum(overlap, 0).to(tl.float64) * d
            taken += count
            below = s
        total += acc / width
    if ACCUMULATE:
        total += tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    tl.store(out_ptr + rows, total, mask=row_ok)


def interval_mean_triton(sim: torch.Tensor, k_min: int, k_max: int, *, out: torch.Tensor | None = None,
                         accumulate: bool = False, block_r: int | None = None,
                         n_others: int | None = None) -> torch.Tensor:
    """Per patch, the mean of the ascending nearest distances ``sorted[k_min:k_max]``, summed over passes.

    Args:
        sim: [N, L, N] or [P, N, L, N] float32 nearest similarities, -inf on the self entries.
        k_min, k_max: the interval (``ops.interval_bounds``); an empty one gives NaN (compat mode).
        out: optional [N, L] float64/float32 result buffer; with ``accumulate`` the new sum is added to it.
        block_r: rows per program (default: ``launch_shape``).
        n_others: finite candidates per row (default N - 1 for a square [N, L, N] table with its -inf
            self entries). A rectangular table [B, L, M] (row groups of a larger set, or new images
            against a bank) needs it: M - 1 or M.
    Returns:
        [N, L] ``out`` (float64 unless given): the interval mean, summed over the P passes.
    """
    if sim.dim() == 3:
        sim = sim[None]
    if sim.dim() != 4 or (n_others is None and sim.shape[1] != sim.shape[3]):
        raise ValueError(f"sim must be [N, L, N] or [P, N, L, N] (or [B, L, M] with n_others), got shape "
                         f"{tuple(sim.shape)}")
    check_device(sim)
    p, n, length, m_cols = sim.shape
    others = m_cols - 1 if n_others is None else int(n_others)
    if out is None:
        out = torch.zeros((n, length), dtype=torch.float64, device=sim.device)
        accumulate = False
    if out.shape != (n, length) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {length}] tensor, got {tuple(out.shape)}")
    k_min, k_max = int(k_min), int(k_max)
    if k_max <= k_min:  # the original's empty mean
        out.fill_(float("nan"))
        return out
    if not 0 <= k_min < k_max <= others:
        raise ValueError(f"interval [{k_min}, {k_max}) is outside the {others} other images")
    simc = sim.to(torch.float32).contiguous()
    auto_r, block_c, warps = launch_shape(m_cols, interpret=interpreting())
    block_r = block_r or auto_r
    rows = n * length
    _interval_mean_kernel[(triton.cdiv(rows, block_r),)](
        simc, out, rows, m_cols, p, rows * m_cols, k_min, k_max, float(k_max - k_min),
        ACCUMULATE=accumulate, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


def launch_shape(n_img: int, *, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for N images. GPU: at most 2048 similarities and at most 16 rows per
    program, 4 warps. The float64 sqrt and division have slow-path subroutine calls in SASS; with more
    rows per thread the registers live across those calls overflowed into 8 bytes of stack (sm_90 build,
    64 x 16 and 64 x 8 and 32 x 16 under Triton 3.6, 64 x 16 under 3.8, with ``accumulate``). 16 rows
    build without stack under both for every N (bench/results/preflight_sm90_*.csv). Small N is cheap
    anyway: the kernel is bound by reading ``sim`` once. Interpreter: 64 rows, fewer Python steps."""
    block_c = max(2, next_pow2(n_img))
    if interpret:
        return 64, block_c, 4
    block_r = max(1, min(16, 2048 // block_c))
    return block_r, block_c, 4 if block_r * block_c <= 2048 else 8
