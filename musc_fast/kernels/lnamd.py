"""LNAMD (SPEC 2) for all degrees r of r_list from one read of the tokens: two small Triton kernels.

What is computed. Z_r = l2norm_C(boxsum_r(zero-pad(LN_CHW(T)))), where LN_CHW subtracts one mean and
divides by one std per image. The std is a positive per-image scalar and the L2 normalisation removes
any positive scale, so Z_r = l2norm_C(boxsum_r(mask * (T - mean))) exactly: only the mean is needed
(the LayerNorm eps, the 1/r^2 divisor and count_include_pad are irrelevant for the same reason; the one
observable difference, F.normalize's 1e-12 floor on the norm, only concerns all-zero rows).

Kernel 1, ``_image_sum_kernel``: program (n, c) sums one contiguous chunk of image n's L*C values in
float64 (robust to ViT outlier channels with large offsets) and writes one partial sum.

Kernel 2, ``_lnamd_box_kernel``: program (n, b) owns ``BLOCK_P`` consecutive patches of image n with all
C channels (``BLOCK_C`` = next power of two >= C). It reduces the partial sums to the image mean, then
for every offset (dy, dx) of the largest window loads the shifted [BLOCK_P, C] token tile once
(masked at the grid border: the zero padding), subtracts the mean and adds it to the accumulator of
every r whose window contains the offset (up to 4 degrees per launch, nested windows share the loads;
dy runs as a loop, dx is unrolled).
It then L2-normalises each accumulator along C and writes Z_r (fp32, or fp16/bf16 if asked).

Memory traffic. Tokens are read from DRAM once for all r (the shifted re-reads of neighbouring
patches hit L1/L2: programs own consecutive patches); each Z_r is written once. The torch path writes
and re-reads the LN'd map, each pooled map and each normalised map (about 4x the bytes), and the
original additionally materialises Unfold's [C r^2, L] (140 MB per image and layer at r=5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grid_side
from ._common import check_device, interpreting, next_pow2

INTERPRETED = interpreting()
MAX_R_PER_LAUNCH = 4


@triton.jit
def _image_sum_kernel(x_ptr, part_ptr, numel, chunk, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """x [N, numel] any float; part [N, NUM_CHUNKS] fp64: sums of chunks of ``chunk`` values."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = x_ptr + n.to(tl.int64) * numel
    start = c * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for off in range(start, start + chunk, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(base + idx, mask=idx < numel, other=0.0).to(tl.float64)
    tl.store(part_ptr + n * NUM_CHUNKS + c, tl.sum(acc, axis=0))


@triton.jit
def _accumulate_offset(acc, v, row_weight, R: tl.constexpr, DX: tl.constexpr):
    # Degree R takes the shifted tile when (dy, DX) lies in its window: DX is checked at compile time,
    # dy (a run-time loop index) through row_weight = 1.0 or 0.0 (adding v * 0 leaves acc unchanged).
    if R > 0:
        if DX * DX <= (R // 2) * (R // 2):
            acc += v * row_weight
    return acc


@triton.jit
def _store_normalised(out_ptr, acc, offs, mask, R: tl.constexpr):
    if R > 0:
        norm = tl.sqrt(tl.sum(acc * acc, axis=1))
        z = acc / tl.maximum(norm, 1e-12)[:, None]  # F.normalize's floor
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lnamd_box_kernel(
    x_ptr, part_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr,
    length, chans, grid_g,
    NUM_CHUNKS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
    HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x [N, L, C] tokens; part [N, NUM_CHUNKS] fp64 partial sums; out_k [N, L, C] for degree R_k
    (R_k = 0: unused slot). HALF = the largest (R_k - 1) / 2."""
    n = tl.program_id(0)
    pb = tl.program_id(1)
    numel = length * chans
    mean = (tl.sum(tl.load(part_ptr + n * NUM_CHUNKS + tl.arange(0, NUM_CHUNKS)), axis=0)
            / numel).to(tl.float32)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    p_ok = p < length
    c_ok = ch < chans
    y = p // grid_g
    x = p - y * grid_g
    base = n.to(tl.int64) * numel
    acc0 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # Rows of the window in a run-time loop, columns unrolled: unrolling both kept (2H+1)^2 tiles in
    # flight and spilled registers for small C (sm_90 build, kernels._sm90 --preflight).
    for a in range(2 * HALF + 1):
        dy = a - HALF
        yy = y + dy
        row_ok = p_ok & (yy >= 0) & (yy < grid_g)
        w0 = tl.where(dy * dy <= (R0 // 2) * (R0 // 2), 1.0, 0.0)
        w1 = tl.where(dy * dy <= (R1 // 2) * (R1 // 2), 1.0, 0.0)
        w2 = tl.where(dy * dy <= (R2 // 2) * (R2 // 2), 1.0, 0.0)
        w3 = tl.where(dy * dy <= (R3 // 2) * (R3 // 2), 1.0, 0.0)
        for b in tl.static_range(2 * HALF + 1):
            xx = x + (b - HALF)
            ok = row_ok & (xx >= 0) & (xx < grid_g)
            m2 = ok[:, None] & c_ok[None, :]
            q = yy * grid_g + xx
            t = tl.load(x_ptr + base + q[:, None] * chans + ch[None, :], mask=m2, other=0.0)
            v = tl.where(m2, t.to(tl.float32) - mean, 0.0)  # zero padding after the LayerNorm
            acc0 = _accumulate_offset(acc0, v, w0, R0, b - HALF)
            acc1 = _accumulate_offset(acc1, v, w1, R1, b - HALF)
            acc2 = _accumulate_offset(acc2, v, w2, R2, b - HALF)
            acc3 = _accumulate_offset(acc3, v, w3, R3, b - HALF)
    offs = base + p[:, None] * chans + ch[None, :]
    mask = p_ok[:, None] & c_ok[None, :]
    _store_normalised(out0_ptr, acc0, offs, mask, R0)
    _store_normalised(out1_ptr, acc1, offs, mask, R1)
    _store_normalised(out2_ptr, acc2, offs, mask, R2)
    _store_normalised(out3_ptr, acc3, offs, mask, R3)


def _check_r(r: int) -> None:
    if int(r) != r or r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation degree r must be odd and positive, got {r}")


def lnamd_triton(tokens: torch.Tensor, r_list, *, out_dtype: torch.dtype = torch.float32,
                 block_p: int | None = None, grid: int | None = None) -> list[torch.Tensor]:
    """LNAMD features of one layer for every r of ``r_list``.

    Args:
        tokens: [N, L, C] patch tokens (no CLS), fp32/fp16/bf16, L = G*G row-major.
        r_list: odd degrees >= 1 (any number; 4 per launch, distinct ones computed once).
        out_dtype: float32 (exact mode) or float16/bfloat16 (half the bytes for the MSM kernel).
        block_p: patches per program (default: ``launch_shape``).
        grid: G (default sqrt(L); a non-square L is an error).
    Returns:
        one Z [N, L, C] ``out_dtype`` with unit rows per r, in the order of ``r_list``.
    """
    r_list = [int(r) for r in r_list]
    for r in r_list:
        _check_r(r)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [N, L, C], got shape {tuple(tokens.shape)}")
    check_device(tokens)
    n, length, chans = tokens.shape
    g = grid_side(length, grid)
    x = tokens.contiguous()
    numel = length * chans
    outs = {r: torch.empty((n, length, chans), dtype=out_dtype, device=x.device) for r in r_list}
    if n == 0 or numel == 0:
        return [outs[r] for r in r_list]

    # Kernel 1: per-image partial sums (enough chunks to fill the GPU even for a batch of 4 images).
    block = 1024
    num_chunks = min(64, next_pow2(triton.cdiv(numel, block)))
    chunk = triton.cdiv(triton.cdiv(numel, num_chunks), block) * block
    part = torch.empty((n, num_chunks), dtype=torch.float64, device=x.device)
    _image_sum_kernel[(n, num_chunks)](x, part, numel, chunk, NUM_CHUNKS=num_chunks, BLOCK=block)

    # Kernel 2: all degrees from one read, 4 per launch.
    auto_p, block_c, warps = launch_shape(chans, interpret=interpreting())
    block_p = block_p or auto_p
    if block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two, got {block_p}")
    distinct = sorted(set(r_list))
    for s in range(0, len(distinct), MAX_R_PER_LAUNCH):
        group = distinct[s:s + MAX_R_PER_LAUNCH]
        rs = group + [0] * (MAX_R_PER_LAUNCH - len(group))
        ptrs = [outs[r] if r else outs[group[0]] for r in rs]  # unused slots get a valid dummy
        _lnamd_box_kernel[(n, triton.cdiv(length, block_p))](
            x, part, *ptrs, length, chans, g,
            NUM_CHUNKS=num_chunks, R0=rs[0], R1=rs[1], R2=rs[2], R3=rs[3], HALF=(max(group) - 1) // 2,
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
        )
    result, seen = [], set()
    for r in r_list:  # a repeated r gets its own tensor, as from the torch path
        result.append(outs[r].clone() if r in seen else outs[r])
        seen.add(r)
    return result


def launch_shape(chans: int, *, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for C channels: all channels of BLOCK_P patches per program, about
    2048 values per accumulator on GPU, 8 per thread at 8 warps (the sm_90 build of r = 1, 3, 5, 7 in one
    launch then needs no spills; 4096 values did). The interpreter takes bigger blocks (fewer steps)."""
    block_c = next_pow2(chans)
    block_p = max(1, min(64, (8192 if interpret else 2048) // block_c))
    return block_p, block_c, 8 if block_p * block_c >= 2048 else 4
