"""Every LNAMD degree r of one layer from ONE Gram block per image pair, in Triton (ops/boxgram.py's identity).

With X the LayerNorm'd tokens of a layer and B_r the r x r zero-padded box SUM over the G x G grid,
s_r(p, q) = (B_r G_ij B_r^T)(p, q) * u_r,i(p) * u_r,j(q), G_ij = X_i X_j^T, u_r = 1 / ||B_r x|| (the box
mean's 1/r^2 folded into u). Three kernels per chunk of image pairs (i < j):
  1. ``_gram_kernel``: one [BLOCK_M, BLOCK_N] tile of G_ij per program (``tl.dot`` over C, fp32
     accumulation). It takes the r = 1 row and column maxima straight from the accumulator (fp32
     ``atomic_max`` into sim, as kernels/mutual_min.py) and stores the tile into a scratch block
     [m, L, LD] (fp32; bf16 in bf16 mode), LD = L rounded up to 16 (aligned rows).
  2. ``_box_rows_kernel``: the box over p's grid for up to 4 degrees r > 1 at once: for each offset
     (dy, dx) of the largest window one row-shifted [BLOCK_P, BLOCK_Q] tile load (rows outside the grid
     masked: the zero padding), added to every degree whose window holds the offset; writes
     F_r = B_r G_ij in fp32, transposed ([q, p]), so that kernel 3's shifts are row shifts too.
  3. ``_box_cols_max_kernel``: the box over q's grid of F_r (row-shifted loads of F_r^T), the scale
     u_r,i(p) u_r,j(q), and both maxima (fp32 atomic max into sim[r]; sim starts at -inf).
Max is exact and commutative, so the result does not depend on program order. All scratch loads and
stores are 128-bit (rows padded to LD, masks constant over 16 columns; checked in the sm_90 SASS).

Design choice (issue 7 item 2 offered "Gram tile on chip with halos" or "block written once and filtered
by a second kernel"). Paper shape: N=200 (19,900 pairs), L=1369 (G=37), C=1024, r in {1, 3, 5}.
  * Per-r Triton path: 3 products per pair, 3 x 2 L^2 C = 11.5 GFLOP per pair, 229 TFLOP per layer.
  * On chip with halos: B_5 reaches 2 grid rows = 2 G + 2 = 76 flat indices each side, and programs
    share nothing on chip, so each tile must compute the Gram entries of its halo itself: 128 output
    rows need 280 Gram rows (2.2x per side, ~4.8x the FLOPs of one Gram), worse than the 3 products it
    replaces; rectangular grid tiles (12 x 12 cells + 2-cell halo = 256 rows: 1.8x per side, 3.2x) are
    no better at sizes that fit on chip.
  * Written once, filtered after (this module): 1 product per pair, 3.8 GFLOP, 76 TFLOP per layer.
    Filter arithmetic ~80 flops per Gram entry (25 shifted tile loads in kernel 2, 9 + 25 in kernel 3,
    from L1/L2), 4 % of the product's 2 C = 2048. Atomics: ~150k per pair (kernel 3: 128 per 64 x 64
    tile and r; kernel 1: 256 per 128 x 128 tile), 2.9 G per layer, fire-and-forget; their cost is a
    thing to measure. DRAM per pair: G written and read (4 + 4 bytes per entry; 2 + 2 in bf16),
    F_3 and F_5 written and read (16): 24 bytes per entry = 45 MB per pair (37.5 MB in bf16), 895 GB
    (746 GB) per layer, 0.19 s (0.16 s) at 4.8 TB/s; the shifted re-reads of kernels 2/3 hit L1/L2.
    Lower bounds on an H200: fp32 (FFMA, 67 TFLOP/s) per-r >= 3.4 s, this >= 1.14 + 0.19 = 1.33 s:
    ~2.6x in exact mode. bf16 (~990 TFLOP/s dense) per-r >= 0.23 s, this >= 0.08 + 0.16 = 0.24 s:
    break-even unless a chunk's scratch stays in the 50 MB L2 (``block_elems`` sets the chunk: 11 pairs
    by default at this shape, 1,809 chunks x 4 launches per layer, ~30 ms of launch overhead).
    Unmeasured: ops.boxgram.use_boxgram keeps ``auto`` on CUDA at per-r passes until a GPU run
    (bench/bench_boxgram.py --providers triton, bench/gpu_check.sh) says otherwise.
F stays fp32 in every mode: rounding the sum of 25 Gram entries to bf16 would cost ~5x the error of
rounding the entries themselves, past the 2x-of-torch rule of the bf16 tests. G is bf16 only in bf16
mode (as torch's cuBLAS bf16 product, ops/boxgram.py on CUDA); fp16 mode keeps G in fp32 because raw
Gram entries of LN'd tokens (~C, more with outlier channels) can pass fp16's 65504.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import bf16_split, grid_side
from ._common import check_device, interpreting, next_pow2

DEFAULT_BLOCK_ELEMS = 1 << 24  # the same default as ops.msm.DEFAULT_BLOCK_ELEMS (64 MiB of fp32)

INTERPRETED = interpreting()  # how this module's kernels were decorated (see kernels._module)
MAX_R_PER_LAUNCH = 4  # degrees r > 1 filtered together by kernel 2

# "fp32": exact, tokens split into three bf16 parts on the tensor cores; "fp32-ieee": exact on the FMA units.
_OPERAND_DTYPE = {"fp32": torch.bfloat16, "fp32-ieee": torch.float32, "bf16": torch.bfloat16,
                  "fp16": torch.float16}
_SPLIT = {"fp32": 3}
_GRAM_DTYPE = {"fp32": torch.float32, "fp32-ieee": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}
MAX_GRID = 2 ** 31 - 1  # 1-D grid limit (CUDA) and the kernels' int32 program ids


@triton.jit
def _gram_kernel(
    x_ptr, gram_ptr, inv_ptr, sim_ptr, pair_i_ptr, pair_j_ptr,
    n_img, length, chans, ld, split_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_R1: tl.constexpr, STORE_GRAM: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, SPLIT: tl.constexpr,
):
    """x [SPLIT, N, L, C] fp32/bf16/fp16, C a multiple of BLOCK_K (the wrapper zero-pads); SPLIT = 3: the
    bf16 parts of fp32 tokens (exact mode on tensor cores, as kernels/mutual_min.py); gram [m, L, ld]
    scratch (pair slot m); inv [N, L] fp32 = 1/||x||; sim [N, L, N] fp32 (the r = 1 table, -inf filled);
    pair_i/pair_j [m] int32. 1-D grid: slot-major."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(length, BLOCK_M)
    n_tiles = tl.cdiv(length, BLOCK_N)
    slot = pid // (m_tiles * n_tiles)
    tile = pid - slot * (m_tiles * n_tiles)
    mt = tile // n_tiles
    nt = tile - mt * n_tiles
    i = tl.load(pair_i_ptr + slot)
    j = tl.load(pair_j_ptr + slot)
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < length
    col_ok = cols < length
    xi = x_ptr + i.to(tl.int64) * length * chans
    xj = x_ptr + j.to(tl.int64) * length * chans
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_N] if SPLIT == 3 else [16, 16], dtype=tl.float32)
    for k0 in range(0, chans, BLOCK_K):
        ks = k0 + offs_k
        a_ptrs = xi + rows[:, None] * chans + ks[None, :]
        b_ptrs = xj + cols[None, :] * chans + ks[:, None]  # X_j^T tile [BLOCK_K, BLOCK_N]
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: its dot multiplies 16-bit bit patterns as integers (exact in fp32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SPLIT == 3:  # cross terms of the bf16 parts into their own (small) accumulator
            a1 = tl.load(a_ptrs + split_stride, mask=row_ok[:, None], other=0.0)
            b1 = tl.load(b_ptrs + split_stride, mask=col_ok[None, :], other=0.0)
            a2 = tl.load(a_ptrs + 2 * split_stride, mask=row_ok[:, None], other=0.0)
            b2 = tl.load(b_ptrs + 2 * split_stride, mask=col_ok[None, :], other=0.0)
            if UPCAST:
                a1 = a1.to(tl.float32)
                b1 = b1.to(tl.float32)
                a2 = a2.to(tl.float32)
                b2 = b2.to(tl.float32)
            acc_lo = tl.dot(a2, b, acc_lo)
            acc_lo = tl.dot(a1, b1, acc_lo)
            acc_lo = tl.dot(a, b2, acc_lo)
            acc_lo = tl.dot(a1, b, acc_lo)
            acc_lo = tl.dot(a, b1, acc_lo)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if SPLIT == 3:
        acc = acc + acc_lo
    both_ok = row_ok[:, None] & col_ok[None, :]
    if STORE_GRAM:
        g_ptrs = gram_ptr + slot.to(tl.int64) * length * ld + rows[:, None] * ld + cols[None, :]
        val = acc
        if ROUND_BY_HAND:
            # Interpreter only: its fp32 -> bf16 cast truncates (biased: the box sums of 25 entries then
            # drift ~5x more), the GPU's rounds to nearest even. Round the bits here; the cast is then exact.
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            val = bits.to(tl.float32, bitcast=True)
        # Columns L..ld-1 get the zeros of the masked loads: defined padding, 16-column-constant mask.
        tl.store(g_ptrs, val.to(gram_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < ld)[None, :])
    if HAS_R1:  # r = 1 needs no filter: its maxima come from the fp32 accumulator
        u_i = tl.load(inv_ptr + i * length + rows, mask=row_ok, other=0.0)
        u_j = tl.load(inv_ptr + j * length + cols, mask=col_ok, other=0.0)
        s = tl.where(both_ok, acc * u_i[:, None] * u_j[None, :], float("-inf"))
        _merge_maxima(sim_ptr, s, i, j, rows, cols, row_ok, col_ok, n_img, length)


@triton.jit
def _merge_maxima(sim_ptr, s, i, j, rows, cols, row_ok, col_ok, n_img, length):
    # s [rows of image i, cols of image j]: sim[i, row, j] = max over cols, sim[j, col, i] = max over rows.
    # Other tiles of the pair are other programs, hence atomics (fire-and-forget red on sm_90). Invalid
    # entries of s are -inf.
    sim_i = sim_ptr + i.to(tl.int64) * length * n_img
    sim_j = sim_ptr + j.to(tl.int64) * length * n_img
    tl.atomic_max(sim_i + rows * n_img + j, tl.max(s, axis=1), mask=row_ok, sem="relaxed")
    tl.atomic_max(sim_j + cols * n_img + i, tl.max(s, axis=0), mask=col_ok, sem="relaxed")


@triton.jit
def _add_if_inside(acc, v, row_weight, R: tl.constexpr, DX: tl.constexpr):
    # Degree R takes the tile shifted by (dy, DX) when the offset lies in its window: DX is checked at
    # compile time, dy (a run-time loop index) through row_weight = 1.0 or 0.0 (v is finite).
    if R > 0:
        if DX * DX <= (R // 2) * (R // 2):
            acc += v * row_weight
    return acc


@triton.jit
def _store_tile(out_ptr, acc, offs, mask, R: tl.constexpr):
    if R > 0:
        tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _box_rows_kernel(
    gram_ptr, f0_ptr, f1_ptr, f2_ptr, f3_ptr, length, ld, grid_g,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, HALF: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """gram [m, L, ld]; f_k [m, L, ld] fp32, TRANSPOSED: f_k[slot, q, p] = box sum of degree R_k of the
    block over p's grid (R_k = 0: unused slot). HALF = the largest (R_k - 1) / 2. 1-D grid: slot-major,
    then p, q tiles."""
    pid = tl.program_id(0)
    p_tiles = tl.cdiv(length, BLOCK_P)
    q_tiles = tl.cdiv(ld, BLOCK_Q)
    slot = pid // (p_tiles * q_tiles)
    tile = pid - slot * (p_tiles * q_tiles)
    pt = tile // q_tiles
    qt = tile - pt * q_tiles
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    q = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = p < length
    # Columns L..ld-1 of a scratch row are padding that no kernel reads as data: running over them keeps
    # masks constant in 16-element groups, so loads and stores vectorise (ld % 16 == 0).
    q_pad = q < ld
    py = p // grid_g
    px = p - py * grid_g
    base = slot.to(tl.int64) * length * ld
    acc0 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    # Window rows in a run-time loop, columns unrolled (as kernels/lnamd.py: both unrolled keeps too
    # many tiles in flight).
    for a in range(2 * HALF + 1):
        dy = a - HALF
        yy = py + dy
        row_ok = p_ok & (yy >= 0) & (yy < grid_g)
        w0 = tl.where(dy * dy <= (R0 // 2) * (R0 // 2), 1.0, 0.0)
        w1 = tl.where(dy * dy <= (R1 // 2) * (R1 // 2), 1.0, 0.0)
        w2 = tl.where(dy * dy <= (R2 // 2) * (R2 // 2), 1.0, 0.0)
        w3 = tl.where(dy * dy <= (R3 // 2) * (R3 // 2), 1.0, 0.0)
        for b in tl.static_range(2 * HALF + 1):
            xx = px + (b - HALF)
            ok = row_ok & (xx >= 0) & (xx < grid_g)  # outside the grid: the zero padding
            src = p + dy * grid_g + (b - HALF)
            v = tl.load(gram_ptr + base + src[:, None] * ld + q[None, :], mask=ok[:, None] & q_pad[None, :],
                        other=0.0).to(tl.float32)
            acc0 = _add_if_inside(acc0, v, w0, R0, b - HALF)
            acc1 = _add_if_inside(acc1, v, w1, R1, b - HALF)
            acc2 = _add_if_inside(acc2, v, w2, R2, b - HALF)
            acc3 = _add_if_inside(acc3, v, w3, R3, b - HALF)
    # Stored transposed so that kernel 3's shifts over q become row shifts (aligned, vectorised loads).
    # Rows p >= L of the tile are zeros; they land in the padding columns of f.
    offs = base + q[None, :] * ld + p[:, None]
    mask = (p < ld)[:, None] & (q < length)[None, :]
    _store_tile(f0_ptr, acc0, offs, mask, R0)
    _store_tile(f1_ptr, acc1, offs, mask, R1)
    _store_tile(f2_ptr, acc2, offs, mask, R2)
    _store_tile(f3_ptr, acc3, offs, mask, R3)


@triton.jit
def _box_cols_max_kernel(
    f_ptr, inv_ptr, sim_ptr, pair_i_ptr, pair_j_ptr, n_img, length, ld, grid_g,
    R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """f [m, L, ld] fp32: f[slot, q, p] from kernel 2 (degree R); inv [N, L] fp32 = 1/||box sum||;
    sim [N, L, N] fp32 (the table of degree R, -inf filled). 1-D grid: slot-major, then q, p tiles."""
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(length, BLOCK_Q)
    p_tiles = tl.cdiv(length, BLOCK_P)
    slot = pid // (p_tiles * q_tiles)
    tile = pid - slot * (p_tiles * q_tiles)
    qt = tile // p_tiles
    pt = tile - qt * p_tiles
    i = tl.load(pair_i_ptr + slot)
    j = tl.load(pair_j_ptr + slot)
    q = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < length
    p_ok = p < length
    p_pad = p < ld  # padding columns read too (vector loads); their values are masked out below
    qy = q // grid_g
    qx = q - qy * grid_g
    base = f_ptr + slot.to(tl.int64) * length * ld
    acc = tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32)
    for a in range(R):
        dy = a - R // 2
        yy = qy + dy
        row_ok = q_ok & (yy >= 0) & (yy < grid_g)
        for b in tl.static_range(R):
            xx = qx + (b - R // 2)
            ok = row_ok & (xx >= 0) & (xx < grid_g)  # outside the grid: the zero padding
            src = q + dy * grid_g + (b - R // 2)
            acc += tl.load(base + src[:, None] * ld + p[None, :], mask=ok[:, None] & p_pad[None, :], other=0.0)
    u_j = tl.load(inv_ptr + j * length + q, mask=q_ok, other=0.0)
    u_i = tl.load(inv_ptr + i * length + p, mask=p_ok, other=0.0)
    # s^T: rows q of image j, columns p of image i (garbage in padding columns becomes -inf here)
    s = tl.where(q_ok[:, None] & p_ok[None, :], acc * u_i[None, :] * u_j[:, None], float("-inf"))
    _merge_maxima(sim_ptr, s, j, i, q, p, q_ok, p_ok, n_img, length)


@dataclasses.dataclass(frozen=True)
class BoxGramConfig:
    """Launch parameters: the Gram tiles (powers of two >= 16, tl.dot's minimum) and the filter tiles."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    rows_p: int = 16  # kernel 2 tile [rows_p, rows_q], up to 4 accumulators
    rows_q: int = 64
    rows_warps: int = 4
    cols_q: int = 64  # kernel 3 tile [cols_q, cols_p] (rows q of the transposed blocks), one accumulator
    cols_p: int = 64
    cols_warps: int = 8
    group: int = 8  # pair-list blocking for L2 reuse (kernels.mutual_min.pair_table)


# GPU defaults: the Gram tiles of kernels/mutual_min.py. The filter kernels are memory-bound, so their
# tiles are sized for occupancy, from the offline sm_90 build (kernels._sm90, triton 3.8, r = 1, 3, 5;
# all loads/stores 128-bit): kernel 2 at 16 x 64 / 4 warps takes 60 registers (128 with 4 degrees),
# kernel 3 at 64 x 64 / 8 warps 92 (R = 5; 126 at R = 9), no spills. Kernel 3 issues 128 atomics per
# 4096 entries. Untimed: no GPU yet.
_DEFAULTS = {
    "bf16": BoxGramConfig(128, 128, 64, num_warps=8, num_stages=3),
    "fp16": BoxGramConfig(128, 128, 64, num_warps=8, num_stages=3),
    "fp32": BoxGramConfig(128, 64, 32, num_warps=8, num_stages=3),
    "fp32-ieee": BoxGramConfig(64, 64, 32, num_warps=4, num_stages=3),
}


def default_config(precision: str, length: int, chans: int) -> BoxGramConfig:
    """The GPU default, or under the interpreter tiles as large as the problem (fewer Python steps)."""
    if interpreting():
        b = min(64, max(16, next_pow2(length)))
        f = min(128, next_pow2(length))
        return BoxGramConfig(b, b, min(64, max(16, next_pow2(chans))), rows_p=f, rows_q=f, cols_p=f, cols_q=f)
    return _DEFAULTS[precision]


def chunk_pairs(n_pairs: int, length: int, n_filtered: int, block_elems: int) -> int:
    """Pairs per chunk: the Gram scratch and up to 4 filtered blocks, each [m, L, LD] (counted as fp32),
    within 4 * block_elems values (at least one pair)."""
    if n_filtered == 0:
        return max(1, n_pairs)  # no scratch: one launch for every pair
    per_pair = length * _lead(length) * (1 + min(n_filtered, MAX_R_PER_LAUNCH))
    return max(1, min(n_pairs, 4 * block_elems // per_pair))


def max_chunk(length: int, ld: int, cfg: BoxGramConfig) -> int:
    """Most pairs per chunk whose grids (pairs x tiles) stay within int32 program ids: with r = 1 alone
    there is no scratch and a chunk would otherwise hold every pair
    (2**31 at N ~ 3000, L = 1369, 64 x 64 tiles; N ~ 4200 at 128 x 64)."""
    tiles = max(triton.cdiv(length, cfg.block_m) * triton.cdiv(length, cfg.block_n),
                triton.cdiv(length, cfg.rows_p) * triton.cdiv(ld, cfg.rows_q),
                triton.cdiv(length, cfg.cols_q) * triton.cdiv(length, cfg.cols_p))
    return max(1, MAX_GRID // tiles)


def _lead(length: int) -> int:
    return -(-length // 16) * 16  # rows of the scratch 64-byte aligned (fp32), 16-byte vector loads


def nearest_similarity_multi_triton(x: torch.Tensor, r_list, *, inv_norms: torch.Tensor, grid: int | None = None,
                                    precision: str = "fp32", block_elems: int | None = None,
                                    config: BoxGramConfig | None = None, pairs=None) -> torch.Tensor:
    """Nearest-patch similarities of every degree r from one Gram block per pair of images.

    Args:
        x: [N, L, C] LayerNorm'd tokens of one layer (``ops.lnamd.layer_norm_chw``), any float dtype;
            L = G * G row-major.
        r_list: odd degrees >= 1 (repeats allowed).
        inv_norms: [R, N, L] float32, 1 / ||B_r x(p)|| per r of ``r_list`` (B_r the r x r box MEAN;
            ``ops.boxgram.box_inverse_norms``): the kernels take the norms, they do not compute box means.
        grid: G (default sqrt(L)).
        precision: ``"fp32"`` (exact: three bf16 parts per value, six tensor-core products, fp32
            accumulation), ``"fp32-ieee"`` (exact on the FMA units), ``"bf16"``/``"fp16"`` (16-bit tensor-core
            operands, fp32 accumulation; see the module docstring for the scratch dtype).
        block_elems: memory knob (default 2**24, as ``ops.msm.DEFAULT_BLOCK_ELEMS``): the scratch of a chunk
            of pairs holds at most 4 * block_elems values.
        config: launch parameters (default per precision).
        pairs: optional work list (``mutual_min.as_pairs``) instead of every i < j; the rest stays -inf.
    Returns:
        sim: [R, N, L, N] float32, ``sim[k, i, p, j] = max_q s_{r_k}(p, q)`` for j != i, -inf for j == i;
        equal to ``ops.boxgram.nearest_similarity_multi_torch``.
    """
    from .mutual_min import as_pairs, pair_table

    if precision not in _OPERAND_DTYPE:
        raise ValueError(f"precision must be one of {sorted(_OPERAND_DTYPE)}, got {precision!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [N, L, C], got shape {tuple(x.shape)}")
    r_list = [int(r) for r in r_list]
    if any(r < 1 or r % 2 == 0 for r in r_list):
        raise ValueError(f"aggregation degrees must be odd and positive, got {r_list}")
    check_device(x)
    n, length, chans = x.shape
    g = grid_side(length, grid)
    if tuple(inv_norms.shape) != (len(r_list), n, length):
        raise ValueError(f"inv_norms must be [{len(r_list)}, {n}, {length}], got {tuple(inv_norms.shape)}")
    distinct = list(dict.fromkeys(r_list))
    sim = torch.full((len(distinct), n, length, n), float("-inf"), dtype=torch.float32, device=x.device)
    if pairs is not None:
        pairs = as_pairs(pairs, n, x.device)
    if n >= 2 and length > 0 and (pairs is None or pairs[0].numel() > 0):
        cfg = config or default_config(precision, length, chans)
        x32 = x.float()
        # 1/||box sum||: the box mean's 1/r^2 folded in, so that s = (B G B^T) u_i u_j.
        inv = inv_norms[[r_list.index(r) for r in distinct]].float()
        inv = inv / torch.tensor([float(r * r) for r in distinct], device=x.device)[:, None, None]
        split = _SPLIT.get(precision, 1)
        feats = bf16_split(x32, split) if split > 1 else x32.to(_OPERAND_DTYPE[precision])[None]
        if chans % cfg.block_k:
            # Zero channels add nothing to a dot product, and whole K tiles keep the Gram kernel's loads
            # unmasked along C (cp.async pipeline; a masked 128 x 128 x 64 bf16 build spilled on sm_90).
            feats = torch.nn.functional.pad(feats, (0, cfg.block_k - chans % cfg.block_k))
        feats = feats.contiguous()
        pi, pj = pairs if pairs is not None else pair_table(n, cfg.group, x.device)
        _run(feats, inv.contiguous(), sim, pi, pj, g, distinct, precision, cfg, block_elems or DEFAULT_BLOCK_ELEMS)
    if len(distinct) == len(r_list):
        return sim
    return sim[torch.tensor([distinct.index(r) for r in r_list], device=x.device)]


def _run(feats, inv, sim, pi, pj, g, distinct, precision, cfg, block_elems) -> None:
    """Launch the three kernels chunk by chunk over the pair list."""
    split, n, length, chans = feats.shape
    big = [k for k, r in enumerate(distinct) if r > 1]
    k1 = distinct.index(1) if 1 in distinct else None
    n_pairs = pi.numel()
    # memory.fits_one_gram budgets 4 * min(block_elems, N L^2) values of temporaries for this path
    m = chunk_pairs(n_pairs, length, len(big), min(block_elems, n * length * length))
    ld = _lead(length)
    m = min(m, max_chunk(length, ld, cfg))
    width = min(len(big), MAX_R_PER_LAUNCH)
    gram = torch.empty((m if big else 1, length, ld), dtype=_GRAM_DTYPE[precision], device=feats.device)
    filt = torch.empty((max(width, 1), m if big else 1, length, ld), dtype=torch.float32, device=feats.device)
    gram_tiles = triton.cdiv(length, cfg.block_m) * triton.cdiv(length, cfg.block_n)
    rows_tiles = triton.cdiv(length, cfg.rows_p) * triton.cdiv(ld, cfg.rows_q)
    cols_tiles = triton.cdiv(length, cfg.cols_q) * triton.cdiv(length, cfg.cols_p)
    r1 = k1 if k1 is not None else 0  # a valid dummy table when r = 1 is not asked for
    for s0 in range(0, n_pairs, m):
        ci, cj = pi[s0:s0 + m], pj[s0:s0 + m]
        mc = ci.numel()
        _gram_kernel[(mc * gram_tiles,)](
            feats, gram, inv[r1], sim[r1], ci, cj, n, length, chans, ld, n * length * chans,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            INPUT_PRECISION="ieee", UPCAST=INTERPRETED and feats.dtype != torch.float32,
            HAS_R1=k1 is not None, STORE_GRAM=bool(big), ROUND_BY_HAND=INTERPRETED and gram.dtype == torch.bfloat16,
            SPLIT=split,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        for s in range(0, len(big), MAX_R_PER_LAUNCH):
            group = big[s:s + MAX_R_PER_LAUNCH]
            rs = [distinct[k] for k in group] + [0] * (MAX_R_PER_LAUNCH - len(group))
            outs = [filt[min(t, len(group) - 1)] for t in range(MAX_R_PER_LAUNCH)]  # unused: valid dummy
            _box_rows_kernel[(mc * rows_tiles,)](
                gram, *outs, length, ld, g, R0=rs[0], R1=rs[1], R2=rs[2], R3=rs[3],
                HALF=(max(rs) - 1) // 2, BLOCK_P=cfg.rows_p, BLOCK_Q=cfg.rows_q, num_warps=cfg.rows_warps,
            )
            for t, k in enumerate(group):
                _box_cols_max_kernel[(mc * cols_tiles,)](
                    filt[t], inv[k], sim[k], ci, cj, n, length, ld, g,
                    R=distinct[k], BLOCK_Q=cfg.cols_q, BLOCK_P=cfg.cols_p, num_warps=cfg.cols_warps,
                )
