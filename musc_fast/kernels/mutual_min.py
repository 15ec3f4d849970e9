"""Mutual nearest-patch similarity (MSM step 1, SPEC 3.1) as one persistent Triton kernel.

What one program computes. The work list is every (pass p, unordered image pair i < j, row tile m of
image i). For one item the program walks over all column tiles of image j and forms each
``BLOCK_M x BLOCK_N`` tile of ``S = Z_i Z_j^T`` on chip (``tl.dot`` over C in ``BLOCK_K`` steps). From
each tile it takes
  * the row maxima, folded into a running maximum held in registers across the column tiles; once
    the walk is done they are complete and are stored straight into ``sim[p, i, rows, j]``;
  * the column maxima over this row tile, merged into ``sim[p, j, cols, i]`` with an fp32
    ``atomic_max``, because the other row tiles of the same pair are other programs.
``sim`` starts as -inf, so the self entries stay -inf and the atomics need no other initial value.
Max is exact and commutative, so the atomics make the result independent of the order in which
programs finish (bitwise deterministic). A tile issues BLOCK_N atomics (fire-and-forget ``red`` on
sm_90) against 2 BLOCK_M BLOCK_N C matmul FLOPs: one atomic per 262k FLOPs at 128 rows and C=1024, so
they cost little; the alternative, a [pairs, row tiles, L] scratch reduced by a second kernel, would be
1.2 GB at N=200.

Memory traffic saved. The original builds, per query image, a copy of the other N-1 images
((N-1) L C floats) and an L x (N-1) L distance matrix, written and read once (1.5 GB per query at
N=200, L=1369). Here nothing of size L x L ever leaves the chip: the only writes are the N L N
maxima (220 MB per pass at N=200), and each unordered pair is multiplied once (half the FLOPs).

Precision. ``"fp32"``: fp32 operands and ``input_precision="ieee"`` (no TF32; exact mode, matches the
fp32 torch path to rounding). ``"tf32"`` (kernel-only, for benchmarks): TF32 tensor cores.
``"bf16"``/``"fp16"``: 16-bit operands (the wrapper casts Z once) with fp32 accumulation on the tensor
cores. The similarity is the only thing rounded; distances are formed later from the maxima.

Work order and L2. Items run in pass-major, pair, row-tile order; the pair list is built on the host in
``group x group`` blocks of (i, j), so the programs running at one time read at most 2 x group distinct
images (16 x 2.8 MB = 45 MB in bf16 at the paper shape, group 8: within the 60 MB L2). The grid is
persistent: ``progs_per_sm`` programs per multiprocessor loop over the items.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, next_pow2, num_sms

INTERPRETED = interpreting()  # how this module's kernels were decorated (see kernels._module)

_PRECISIONS = {"fp32": "ieee", "tf32": "tf32", "bf16": "ieee", "fp16": "ieee"}
_OPERAND_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                  "fp16": torch.float16}


@triton.jit
def _mutual_min_kernel(
    z_ptr, sim_ptr, pair_i_ptr, pair_j_ptr,
    n_img, length, chans, n_pairs, n_items, n_progs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """z [P, N, L, C] (fp32/bf16/fp16, contiguous); sim [P, N, L, N] fp32, pre-filled with -inf."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(length, BLOCK_M)
    items_per_pass = n_pairs * m_tiles
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    img_elems = length * chans  # one image of Z
    img_sims = length * n_img  # one image's rows of sim
    for item in range(pid, n_items, n_progs):
        p = item // items_per_pass
        rem = item - p * items_per_pass
        pair = rem // m_tiles
        mt = rem - pair * m_tiles
        i = tl.load(pair_i_ptr + pair)
        j = tl.load(pair_j_ptr + pair)
        # 64-bit image offsets: P*N*L*C exceeds 2**31 at the paper shape with several passes.
        zi = z_ptr + (p * n_img + i).to(tl.int64) * img_elems
        zj = z_ptr + (p * n_img + j).to(tl.int64) * img_elems
        rows = mt * BLOCK_M + offs_m
        row_ok = rows < length
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        sim_i = sim_ptr + (p * n_img + i).to(tl.int64) * img_sims
        sim_j = sim_ptr + (p * n_img + j).to(tl.int64) * img_sims
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < length
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, chans, BLOCK_K):
                ks = k0 + offs_k
                a_ptrs = zi + rows[:, None] * chans + ks[None, :]
                b_ptrs = zj + cols[None, :] * chans + ks[:, None]  # Z_j^T tile [BLOCK_K, BLOCK_N]
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
                else:
                    k_ok = ks < chans
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    # Interpreter only: its dot multiplies 16-bit float bit patterns as integers.
                    # Products of bf16/fp16 values are exact in fp32, so the numbers are unchanged.
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            # Padded rows/columns hold dot products with zero vectors: keep them out of the maxima.
            row_max = tl.maximum(row_max, tl.max(tl.where(col_ok[None, :], acc, float("-inf")), axis=1))
            col_max = tl.max(tl.where(row_ok[:, None], acc, float("-inf")), axis=0)
            tl.atomic_max(sim_j + cols * n_img + i, col_max, mask=col_ok, sem="relaxed")
        tl.store(sim_i + rows * n_img + j, row_max, mask=row_ok)


@dataclasses.dataclass(frozen=True)
class MutualMinConfig:
    """Launch parameters. Block sizes are powers of two >= 16 (tl.dot's minimum)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    progs_per_sm: int = 2
    group: int = 8  # pair-list blocking for L2 reuse


# GPU defaults per precision, checked by an offline sm_90 build (kernels._sm90; triton 3.8): 128x128x64
# bf16 tiles with 3 stages take 96 KB of shared memory and 240 registers x 256 threads, so one program per
# SM (the usual Triton Hopper matmul shape; wgmma, cp.async pipeline, no spills). fp32 "ieee" runs on the
# FMA units: 64x64x32 with 4 warps takes 168 registers, three programs per SM.
_DEFAULTS = {
    "bf16": MutualMinConfig(128, 128, 64, num_warps=8, num_stages=3, progs_per_sm=1),
    "fp16": MutualMinConfig(128, 128, 64, num_warps=8, num_stages=3, progs_per_sm=1),
    "tf32": MutualMinConfig(128, 128, 32, num_warps=8, num_stages=3, progs_per_sm=1),
    "fp32": MutualMinConfig(64, 64, 32, num_warps=4, num_stages=3, progs_per_sm=3),
}
# Candidates tried when MUSC_FAST_AUTOTUNE=1 (timed once per (L, C, precision, device) in a process).
# All build without spills for sm_90; 128x256 tiles and 128x128 with 4 warps spill and are left out.
CANDIDATES = {
    "bf16": [_DEFAULTS["bf16"],
             MutualMinConfig(64, 128, 64, num_warps=4, num_stages=4, progs_per_sm=2),
             MutualMinConfig(128, 64, 128, num_warps=8, num_stages=3, progs_per_sm=1),
             MutualMinConfig(128, 128, 64, num_warps=8, num_stages=4, progs_per_sm=1)],
    "tf32": [_DEFAULTS["tf32"],
             MutualMinConfig(128, 64, 32, num_warps=4, num_stages=4, progs_per_sm=2),
             MutualMinConfig(64, 128, 32, num_warps=4, num_stages=4, progs_per_sm=2)],
    "fp32": [_DEFAULTS["fp32"],
             MutualMinConfig(128, 64, 32, num_warps=8, num_stages=2, progs_per_sm=1),
             MutualMinConfig(64, 128, 16, num_warps=8, num_stages=3, progs_per_sm=1),
             MutualMinConfig(64, 64, 64, num_warps=4, num_stages=3, progs_per_sm=2)],
}
CANDIDATES["fp16"] = CANDIDATES["bf16"]
_TUNED: dict[tuple, MutualMinConfig] = {}


def default_config(precision: str, length: int, chans: int) -> MutualMinConfig:
    """The GPU default, or under the interpreter one tile as large as the problem (fewer Python steps)."""
    if interpreting():
        b = min(64, max(16, next_pow2(length)))
        return MutualMinConfig(b, b, min(64, max(16, next_pow2(chans))), progs_per_sm=1)
    return _DEFAULTS[precision]


def pair_table(n: int, group: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair_i, pair_j) int32 [N (N-1) / 2]: every i < j, ordered in ``group x group`` blocks of (i, j)
    so that programs running together read few distinct images. Cached per (N, group, device)."""
    return _pair_table(n, group, str(device))


@functools.lru_cache(maxsize=32)
def _pair_table(n: int, group: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = np.triu_indices(n, k=1)
    order = np.lexsort((j, i, j // group, i // group))  # the last key sorts first
    return (torch.from_numpy(i[order].astype(np.int32)).to(device),
            torch.from_numpy(j[order].astype(np.int32)).to(device))


def _launch(zc: torch.Tensor, sim: torch.Tensor, precision: str, cfg: MutualMinConfig,
            max_items: int | None = None) -> None:
    p, n, length, chans = zc.shape
    pi, pj = pair_table(n, cfg.group, zc.device)
    n_pairs = pi.numel()
    n_items = p * n_pairs * triton.cdiv(length, cfg.block_m)
    if max_items is not None:
        n_items = min(n_items, max_items)
    n_progs = max(1, min(n_items, num_sms(zc.device) * cfg.progs_per_sm))
    _mutual_min_kernel[(n_progs,)](
        zc, sim, pi, pj, n, length, chans, n_pairs, n_items, n_progs,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=chans % cfg.block_k == 0, INPUT_PRECISION=_PRECISIONS[precision],
        UPCAST=INTERPRETED and zc.dtype != torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _autotune(zc: torch.Tensor, sim: torch.Tensor, precision: str) -> MutualMinConfig:
    """Time the candidates on the first few waves of the real work (the maxima are idempotent, so
    re-running items into the same buffer is harmless; the buffer is reset after) and keep the fastest
    for this (L, C, precision, device)."""
    import triton.testing

    p, n, length, chans = zc.shape
    key = (length, chans, precision, str(zc.device))
    if key not in _TUNED:
        timings = []
        for cfg in CANDIDATES[precision]:
            total = p * (n * (n - 1) // 2) * triton.cdiv(length, cfg.block_m)
            items = min(total, 8 * num_sms(zc.device) * cfg.progs_per_sm)  # about 8 items per program
            try:
                ms = triton.testing.do_bench(
                    lambda cfg=cfg, items=items: _launch(zc, sim, precision, cfg, max_items=items),
                    warmup=5, rep=20)
            except Exception:  # a config that does not fit this GPU (shared memory, registers)
                continue
            timings.append((ms / (items * cfg.block_m), cfg))  # per row of work: fair across BLOCK_M
        _TUNED[key] = min(timings, key=lambda t: t[0])[1] if timings else _DEFAULTS[precision]
        sim.fill_(float("-inf"))
    return _TUNED[key]


def nearest_similarity_triton(z: torch.Tensor, *, precision: str = "fp32",
                              config: MutualMinConfig | None = None) -> torch.Tensor:
    """Nearest-patch similarity for every ordered pair of distinct images, one or several passes at once.

    Args:
        z: [N, L, C] or [P, N, L, C] unit rows (P passes, e.g. layers, in one launch); any float dtype.
        precision: ``"fp32"`` (exact, TF32 off), ``"bf16"``/``"fp16"`` (16-bit tensor-core operands, fp32
            accumulation), ``"tf32"`` (kernel-only).
        config: launch parameters; default per precision, or tuned when ``MUSC_FAST_AUTOTUNE=1``.
    Returns:
        sim: [N, L, N] (or [P, N, L, N]) float32, ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>`` for j != i,
        -inf for j == i.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if z.dim() not in (3, 4):
        raise ValueError(f"z must be [N, L, C] or [P, N, L, C], got shape {tuple(z.shape)}")
    check_device(z)
    single = z.dim() == 3
    zc = (z[None] if single else z).to(_OPERAND_DTYPE[precision]).contiguous()
    p, n, length, _ = zc.shape
    sim = torch.full((p, n, length, n), float("-inf"), dtype=torch.float32, device=z.device)
    if n >= 2 and length > 0:
        if config is None:
            tune = os.environ.get("MUSC_FAST_AUTOTUNE", "0") == "1" and not interpreting()
            config = _autotune(zc, sim, precision) if tune else default_config(precision, length,
                                                                                 zc.shape[3])
        _launch(zc, sim, precision, config)
    return sim[0] if single else sim
