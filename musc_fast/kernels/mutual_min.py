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

Precision. ``"fp32"`` (exact mode, on tensor cores): each value is split on the host into three bf16
parts z = z0 + z1 + z2 (``ops.msm.bf16_split``: 24 bits, fp32's mantissa) and the tile is the sum of six
bf16 wgmma products (z0 z0^T in one fp32 accumulator, the five cross terms down to 2**-16 relative in a
second), fp32 accumulation: error vs float64 within 2x that of torch's fp32 matmul with TF32 off (tested
in tests/test_msm.py: in torch emulation at C=1024, and by its triton-marked tests in the interpreter).
``"fp32-ieee"``: fp32 operands and ``input_precision="ieee"`` on the FMA units (the former exact mode).
``"tf32"`` (kernel-only, for benchmarks): TF32 tensor cores. ``"bf16"``/``"fp16"``: 16-bit operands (the
wrapper casts Z once) with fp32 accumulation on the tensor cores. The similarity is the only thing
rounded; distances are formed later from the maxima. C is zero-padded to the K block (no masked K loads:
a masked bf16 build at C=1000 spilled and lost the cp.async pipeline).

Work order and L2. Items run in pass-major, pair, row-tile order; the pair list is built on the host in
``group x group`` blocks of (i, j), so the programs running at one time read at most 2 x group distinct
images (16 x 2.8 MB = 45 MB in bf16 at the paper shape, group 8: within the 60 MB L2). The grid is
persistent (``progs_per_sm`` programs per multiprocessor) and programs take items from an atomic counter,
so a grid larger than what is resident (one register too many) costs nothing and leaves no tail.

Loop form (issue 11). Two forms of the same arithmetic, chosen by ``MutualMinConfig.flatten``:
  * nested (the defaults): a software-pipelined K loop per column tile; it drains at the end of each tile,
    then the epilogue (row max, column max, red.max) runs and the next tile's loads start afterwards;
  * flattened (``tl.range(..., flatten=True)``, autotune candidates): one pipelined loop over
    (column tile, K step), so the next tile's first loads are in flight during a tile's epilogue.
Both sum each entry over K in the same BLOCK_K order, so they give the same bits (tested). Loads are
unmasked: row/column indices past L are clamped to the last row (whose copies the maxima then mask out),
which took the bf16 default from 240 to 208 registers (Triton 3.8; 255 -> 203 under 3.6, where one more
register would have spilled). The flattened loop needs more registers: at 128x128 with 8 warps it reaches
255 and spills 16-32 bytes (fp16/tf32), so it is offered only with 128x64 (or 64x64) tiles and 4 warps,
two programs per SM. That shape is also the cheaper column-max reduction Triton allows: the column max
of a tile is Triton's own tl.max (in-thread, then butterfly shuffles across the lanes that hold other
rows, then across warps through shared memory), and its cost per entry falls with the rows each thread
holds - 4 with 128x64 / 4 warps, 2 with 128x128 / 8 warps. No public Triton op changes that lowering.

Offline sm_90 SASS per column tile, bf16, Triton 3.8 (3.6), dynamic counts read from the loop regions
(bench/results/preflight_sm90_*.csv has the static totals, SHFL/BAR/instrs columns):
  before (masked loads, nested, 128x128x64, 8 warps): K step 88 (86) instructions; epilogue + drain about
    1100 (1200) instructions with 196 (112) shuffles and 26 (13) barriers, i.e. 17 (19) thread-instructions
    and 3.1 (1.8) shuffles per tile entry;
  default now (unmasked, nested, same tile): K step 73 (63); epilogue about 1110 (1100), same shuffles;
  flattened candidate (128x64x64, 4 warps): K step about 136 (137) for 8 wgmma; epilogue 734 (728) with
    88 (60) shuffles and 13 (8) barriers: 11.5 (11.4) thread-instructions and 1.4 (0.9) shuffles per entry,
    overlapped with the next tile's loads and with the other resident program's products.

Expected speed (an ESTIMATE, UNMEASURED: no GPU run yet; never quote it as a result). Per 128x128 column
tile at C=1024 the tensor cores work about 8200 cycles (16 K steps); the default's epilogue issues about
2200 cycles (1110 instructions x 8 warps over 4 schedulers) plus a pipeline refill (~700), with nothing
else resident to overlap them, and the last row and column tiles of L=1369 are 70 % full: about 70 % of
the kernel's own main-loop rate, which for a cp.async (non-TMA) Triton main loop is itself perhaps 80-90 %
of cuBLAS. So bf16/fp16 (default): about 55-65 % of the torch.mm bf16 rate at the per-pair shape. The
flattened 128x64 candidate hides its epilogue behind the other program if its narrower wgmma (n=64) and
its 1.5x operand traffic per FLOP do not become the limit: anywhere from below the default to about
70-80 % - which is why it is a timed candidate (MUSC_FAST_AUTOTUNE=1), not the default. "fp32" (6 products
per K step, the same epilogue per tile, so 6x less relative overhead) about 80-90 % of one sixth of the
bf16 rate (~2.5-3x cuBLAS SGEMM); "fp32-ieee" about the SGEMM rate. The targets (>= 60 % of the matmul
rate) are not shown to be met until a GPU run measures them.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from . import bf16_split
from ._common import check_device, interpreting, next_pow2, num_sms

INTERPRETED = interpreting()  # how this module's kernels were decorated (see kernels._module)

# Precision -> tl.dot input precision of the main product, operand dtype, number of bf16 parts per value.
_PRECISIONS = {"fp32": "ieee", "fp32-ieee": "ieee", "tf32": "tf32", "bf16": "ieee", "fp16": "ieee"}
_OPERAND_DTYPE = {"fp32": torch.bfloat16, "fp32-ieee": torch.float32, "tf32": torch.float32,
                  "bf16": torch.bfloat16, "fp16": torch.float16}
_SPLIT = {"fp32": 3}
MAX_ITEMS = 2 ** 31 - 1  # work items are int32 in the kernel


@triton.jit
def _dot_split(zi, zj, rows, cols, ks, chans, split_stride, acc, acc_lo,
               INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    # One K step of the tile. SPLIT == 3: the operands are the bf16 parts z = z0 + z1 + z2 (ops.msm.bf16_split,
    # planes split_stride apart); z0 z0^T goes into acc, the five cross terms down to 2**-16 relative into
    # acc_lo (2**-8 of acc's size, so its own rounding is negligible) - six bf16 tensor-core products that
    # together carry fp32's 24 bits. SPLIT == 1: one product of the operands as they are.
    # rows/cols are clamped to the image (padding rows repeat the last one and are masked out of the
    # maxima by the caller), so the loads need no masks: fewer live predicates in the pipelined loop.
    a_ptrs = zi + rows[:, None] * chans + ks[None, :]
    b_ptrs = zj + cols[None, :] * chans + ks[:, None]  # Z_j^T tile [BLOCK_K, BLOCK_N]
    a0 = tl.load(a_ptrs)
    b0 = tl.load(b_ptrs)
    if SPLIT == 3:
        a1 = tl.load(a_ptrs + split_stride)
        b1 = tl.load(b_ptrs + split_stride)
        a2 = tl.load(a_ptrs + 2 * split_stride)
        b2 = tl.load(b_ptrs + 2 * split_stride)
        if UPCAST:  # interpreter only (see below): bf16 products are exact in fp32, numbers unchanged
            a1 = a1.to(tl.float32)
            b1 = b1.to(tl.float32)
            a2 = a2.to(tl.float32)
            b2 = b2.to(tl.float32)
    if UPCAST:
        # Interpreter only: its dot multiplies 16-bit float bit patterns as integers.
        # Products of bf16/fp16 values are exact in fp32, so the numbers are unchanged.
        a0 = a0.to(tl.float32)
        b0 = b0.to(tl.float32)
    if SPLIT == 3:
        acc_lo = tl.dot(a2, b0, acc_lo)
        acc_lo = tl.dot(a1, b1, acc_lo)
        acc_lo = tl.dot(a0, b2, acc_lo)
        acc_lo = tl.dot(a1, b0, acc_lo)
        acc_lo = tl.dot(a0, b1, acc_lo)
    acc = tl.dot(a0, b0, acc, input_precision=INPUT_PRECISION)
    return acc, acc_lo


@triton.jit
def _mutual_min_kernel(
    z_ptr, sim_ptr, pair_i_ptr, pair_j_ptr, counter_ptr,
    n_img, length, chans, n_pairs, n_items, split_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, FLATTEN: tl.constexpr,
):
    """z [SPLIT, P, N, L, C] (fp32/bf16/fp16, contiguous; C a multiple of BLOCK_K, the wrapper zero-pads);
    sim [P, N, L, N] fp32, pre-filled with -inf; counter [1] int32, zero: the next work item."""
    m_tiles = tl.cdiv(length, BLOCK_M)
    items_per_pass = n_pairs * m_tiles  # < 2**31: checked on the host (work_items)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    img_elems = length * chans  # one image of Z
    img_sims = length * n_img  # one image's rows of sim
    # Work is handed out by an atomic counter, not a static stride: a program that is not resident
    # (occupancy below the grid size) simply takes no items, and no item waits for a late program.
    item = tl.atomic_add(counter_ptr, 1)
    while item < n_items:
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
        rows_ld = tl.minimum(rows, length - 1)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        sim_i = sim_ptr + (p * n_img + i).to(tl.int64) * img_sims
        sim_j = sim_ptr + (p * n_img + j).to(tl.int64) * img_sims
        for n0 in tl.range(0, length, BLOCK_N, flatten=FLATTEN):
            cols = n0 + offs_n
            col_ok = cols < length
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_lo = tl.zeros([BLOCK_M, BLOCK_N] if SPLIT == 3 else [16, 16], dtype=tl.float32)
            for k0 in range(0, chans, BLOCK_K):
                acc, acc_lo = _dot_split(zi, zj, rows_ld, tl.minimum(cols, length - 1), k0 + offs_k, chans,
                                         split_stride, acc, acc_lo, INPUT_PRECISION, UPCAST, SPLIT)
            if SPLIT == 3:
                acc = acc + acc_lo
            # Padded rows/columns (copies of the last row/column) stay out of the maxima.
            row_max = tl.maximum(row_max, tl.max(tl.where(col_ok[None, :], acc, float("-inf")), axis=1))
            col_max = tl.max(tl.where(row_ok[:, None], acc, float("-inf")), axis=0)
            tl.atomic_max(sim_j + cols * n_img + i, col_max, mask=col_ok, sem="relaxed")
        tl.store(sim_i + rows * n_img + j, row_max, mask=row_ok)
        item = tl.atomic_add(counter_ptr, 1)


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
    # One flattened, software-pipelined loop over (column tile, K step) instead of a K loop per column
    # tile: the next tile's loads are in flight during a tile's epilogue (no drain and refill per tile).
    # Same products in the same K order, so the same bits; builds spill-free only for smaller tiles.
    flatten: bool = False


# GPU defaults per precision, checked by an offline sm_90 build (kernels._sm90; Triton 3.6 and 3.8):
# 128x128x64 bf16 tiles with 3 stages take 96 KB of shared memory and 208 (3.8) / 203 (3.6) registers x 256
# threads (240 / 255 before the loads lost their masks), so one program per SM (the usual Triton Hopper
# matmul shape; wgmma, cp.async pipeline, no spills). "fp32" (exact, split in three bf16 parts) holds two
# accumulators and six operand tiles: 128x64x32 with 8 warps. "fp32-ieee" runs on the FMA units: 64x64x32
# with 4 warps takes 128 (3.8) / 168 (3.6) registers, three programs per SM. progs_per_sm only sizes the
# grid: work comes from an atomic counter, so programs that are not resident take no items. The defaults
# keep the per-tile K loop (see "Expected speed" in the module docstring for why).
_DEFAULTS = {
    "bf16": MutualMinConfig(128, 128, 64, num_warps=8, num_stages=3, progs_per_sm=1),
    "fp16": MutualMinConfig(128, 128, 64, num_warps=8, num_stages=3, progs_per_sm=1),
    "tf32": MutualMinConfig(128, 128, 32, num_warps=8, num_stages=3, progs_per_sm=1),
    "fp32": MutualMinConfig(128, 64, 32, num_warps=8, num_stages=3, progs_per_sm=1),
    "fp32-ieee": MutualMinConfig(64, 64, 32, num_warps=4, num_stages=3, progs_per_sm=3),
}
# Candidates tried when MUSC_FAST_AUTOTUNE=1 (timed once per (L, C, precision, device) in a process).
# All build without spills or stack for sm_90 under Triton 3.6 and 3.8 (bench/preflight_sm90.py builds
# every candidate); 128x256 tiles, 128x128 with 4 warps, a flattened 128x128 (255 registers, 16-32 bytes
# of stack) and 128x64x32 fp32-ieee with 8 warps, 2 stages (8 bytes under 3.6) are left out.
# Every candidate of a precision has the default's BLOCK_K: the fp32 sums then run in the same order
# whichever wins (tile shape and loop form do not change the K order of an entry), so the choice (timing
# noise) cannot change result bits; under torch.distributed rank 0's choice is broadcast as well
# (``_shared_choice``). The flattened candidates: 4 warps and 128x64 tiles (two programs per SM, so one's
# epilogue overlaps the other's products; 4 rows per thread halve the column-max shuffles per entry).
CANDIDATES = {
    "bf16": [_DEFAULTS["bf16"],
             MutualMinConfig(64, 128, 64, num_warps=4, num_stages=4, progs_per_sm=2),
             MutualMinConfig(128, 128, 64, num_warps=8, num_stages=4, progs_per_sm=1),
             MutualMinConfig(128, 64, 64, num_warps=4, num_stages=3, progs_per_sm=2, flatten=True)],
    "tf32": [_DEFAULTS["tf32"],
             MutualMinConfig(128, 64, 32, num_warps=4, num_stages=4, progs_per_sm=2),
             MutualMinConfig(64, 128, 32, num_warps=4, num_stages=4, progs_per_sm=2),
             MutualMinConfig(128, 64, 32, num_warps=4, num_stages=3, progs_per_sm=2, flatten=True)],
    "fp32": [_DEFAULTS["fp32"],
             MutualMinConfig(64, 64, 32, num_warps=4, num_stages=3, progs_per_sm=2),
             MutualMinConfig(128, 64, 32, num_warps=8, num_stages=3, progs_per_sm=1, flatten=True)],
    "fp32-ieee": [_DEFAULTS["fp32-ieee"],
                  MutualMinConfig(64, 64, 32, num_warps=4, num_stages=3, progs_per_sm=2, flatten=True),
                  MutualMinConfig(128, 64, 32, num_warps=8, num_stages=3, progs_per_sm=1, flatten=True)],
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


def work_items(passes: int, n_pairs: int, length: int, block_m: int) -> int:
    """Work items of one launch (pass, pair, row tile); the kernel counts them in int32."""
    n_items = passes * n_pairs * triton.cdiv(length, block_m)
    if n_items > MAX_ITEMS:
        raise ValueError(f"{n_items} work items (passes={passes}, pairs={n_pairs}, L={length}, "
                         f"BLOCK_M={block_m}) exceed int32: score fewer images or passes per call")
    return n_items


def as_pairs(pairs, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A custom work list -> (pair_i, pair_j) int32 on ``device``: an [M, 2] array/tensor or a pair of
    [M] index vectors, i != j, both in [0, N). Row maxima go to sim[i, :, j], column maxima to sim[j, :, i]."""
    if isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(isinstance(t, torch.Tensor) for t in pairs):
        pi, pj = pairs
    else:
        t = torch.as_tensor(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
        pi, pj = t[:, 0], t[:, 1]
    pi, pj = pi.to(device=device, dtype=torch.int32).contiguous(), pj.to(device=device, dtype=torch.int32).contiguous()
    if pi.shape != pj.shape or pi.dim() != 1:
        raise ValueError(f"pairs must be [M, 2] or two [M] vectors, got {tuple(pi.shape)} and {tuple(pj.shape)}")
    if pi.numel() and (int(pi.min()) < 0 or int(pj.min()) < 0 or int(pi.max()) >= n or int(pj.max()) >= n
                       or bool((pi == pj).any())):
        raise ValueError(f"pairs must be (i, j) with i != j in [0, {n})")
    return pi, pj


def _launch(zc: torch.Tensor, sim: torch.Tensor, precision: str, cfg: MutualMinConfig,
            max_items: int | None = None, pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """zc [SPLIT, P, N, L, C] operands, C a multiple of cfg.block_k; ``pairs`` (``as_pairs``) replaces
    the list of every i < j."""
    split, p, n, length, chans = zc.shape
    assert chans % cfg.block_k == 0, (chans, cfg.block_k)
    pi, pj = pairs if pairs is not None else pair_table(n, cfg.group, zc.device)
    n_pairs = pi.numel()
    n_items = work_items(p, n_pairs, length, cfg.block_m)
    if max_items is not None:
        n_items = min(n_items, max_items)
    # An upper bound on resident programs; the atomic counter makes any surplus harmless.
    n_progs = max(1, min(n_items, num_sms(zc.device) * cfg.progs_per_sm))
    counter = torch.zeros(1, dtype=torch.int32, device=zc.device)
    _mutual_min_kernel[(n_progs,)](
        zc, sim, pi, pj, counter, n, length, chans, n_pairs, n_items, p * n * length * chans,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        INPUT_PRECISION=_PRECISIONS[precision], UPCAST=INTERPRETED and zc.dtype != torch.float32,
        SPLIT=split, FLATTEN=cfg.flatten, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _shared_choice(index: int) -> int:
    """Rank 0's candidate index under an initialised torch.distributed group (every rank then runs the
    same config), else ``index``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return index
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([index], dtype=torch.int64, device=dev)
    dist.broadcast(t, src=0)
    return int(t.item())


def _autotune(zc: torch.Tensor, sim: torch.Tensor, precision: str,
              pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> MutualMinConfig:
    """Time the candidates on the first few waves of the real work (the maxima are idempotent, so
    re-running items into the same buffer is harmless; the buffer is reset after) and keep the fastest
    for this (L, C, precision, device)."""
    import triton.testing

    _, p, n, length, chans = zc.shape
    key = (length, chans, precision, str(zc.device))
    if key not in _TUNED:
        cands = CANDIDATES[precision]
        assert len({c.block_k for c in cands}) == 1, "candidates must share BLOCK_K (identical results)"
        timings = []
        for idx, cfg in enumerate(cands):
            n_pairs = n * (n - 1) // 2 if pairs is None else pairs[0].numel()
            total = p * n_pairs * triton.cdiv(length, cfg.block_m)
            items = min(total, 8 * num_sms(zc.device) * cfg.progs_per_sm)  # about 8 items per program
            try:
                ms = triton.testing.do_bench(
                    lambda cfg=cfg, items=items: _launch(zc, sim, precision, cfg, max_items=items, pairs=pairs),
                    warmup=5, rep=20)
            except Exception:  # a config that does not fit this GPU (shared memory, registers)
                continue
            timings.append((ms / (items * cfg.block_m), idx))  # per row of work: fair across BLOCK_M
        best = min(timings)[1] if timings else 0
        _TUNED[key] = cands[_shared_choice(best)]
        sim.fill_(float("-inf"))
    return _TUNED[key]


def nearest_similarity_triton(z: torch.Tensor, *, precision: str = "fp32",
                              config: MutualMinConfig | None = None, pairs=None) -> torch.Tensor:
    """Nearest-patch similarity for every ordered pair of distinct images, one or several passes at once.

    Args:
        z: [N, L, C] or [P, N, L, C] unit rows (P passes, e.g. layers, in one launch); any float dtype.
        precision: ``"fp32"`` (exact: each value split into three bf16 parts, six tensor-core products,
            fp32 accumulation), ``"fp32-ieee"`` (exact on the FMA units, ``input_precision="ieee"``),
            ``"bf16"``/``"fp16"`` (16-bit tensor-core operands, fp32 accumulation), ``"tf32"`` (kernel-only).
        config: launch parameters; default per precision, or tuned when ``MUSC_FAST_AUTOTUNE=1``.
        pairs: optional work list (``as_pairs``: [M, 2] or two [M] vectors, i != j) instead of every
            i < j: only those pairs are computed (both directions), the rest of ``sim`` stays -inf. The
            engine uses it for sharded blocks (tasks of one rank) and cross scoring ([Za; Zb] with only
            the pairs (a, Na + b)).
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
    zp = z[None] if single else z
    p, n, length, chans = zp.shape
    sim = torch.full((p, n, length, n), float("-inf"), dtype=torch.float32, device=z.device)
    if pairs is not None:
        pairs = as_pairs(pairs, n, z.device)
    if n >= 2 and length > 0 and (pairs is None or pairs[0].numel() > 0):
        if config is None:
            tune = os.environ.get("MUSC_FAST_AUTOTUNE", "0") == "1" and not interpreting()
            base = default_config(precision, length, chans)
            block_k = CANDIDATES[precision][0].block_k if tune else base.block_k
        else:
            block_k = config.block_k
        split = _SPLIT.get(precision, 1)
        zc = bf16_split(zp, split) if split > 1 else zp.to(_OPERAND_DTYPE[precision])[None]
        if chans % block_k:
            # Zero channels add nothing to a dot product; whole K tiles keep the loads unmasked along C
            # (cp.async pipeline; a masked bf16 build at C=1000 spilled on sm_90), as kernels/boxgram.py.
            zc = torch.nn.functional.pad(zc, (0, block_k - chans % block_k))
        zc = zc.contiguous()
        if config is None:
            config = _autotune(zc, sim, precision, pairs) if tune else base
        _launch(zc, sim, precision, config, pairs=pairs)
    return sim[0] if single else sim
