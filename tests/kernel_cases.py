"""Triton kernels and the FAISS provider against the float64 references, directly and through the gate.

Collected through tests/test_kernels.py, which decides where they run: under the Triton interpreter on
CPU tensors (no CUDA device; tiny shapes), or compiled on the GPU (CUDA and no TRITON_INTERPRET), where the
``gpu``-marked tests add larger shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from musc_fast import kernels

pytest.importorskip("triton")
from musc_fast.kernels.mutual_min import MutualMinConfig  # noqa: E402  (imports triton)
from musc_fast.ops import SmallBatchWarning, backend, interval_bounds, lnamd, lnamd_multi, mutual_scores
from musc_fast.ops.lnamd import lnamd_multi_torch
from musc_fast.ops.msm import interval_mean_from_similarity, nearest_similarity_torch
from musc_fast.ops.reference import (
    lnamd_reference,
    mutual_scores_reference,
    nearest_distances_reference,
)
from tests.helpers import unit_rows, with_duplicates

# Tolerances, beside the dtype they apply to.
ATOL_SIM_FP32 = 1e-6  # fp32 similarities: kernel vs torch's fp32 matmul (both ~1e-7 from fp64)
# ... at C=1024 the two summation orders differ more: 3.6e-7 measured between torch's fp32 matmul and a
# 32-wide blocked fp32 sum on CPU (1369 x 1369 maxima); 2e-6 leaves room for more rows.
ATOL_SIM_FP32_C1024 = 2e-6
ATOL_FP32 = 1e-5  # fp32 scores/distances vs the fp64 reference (the bar; golden README 1.1e-6)
ATOL_TIES = 1e-3  # identical vectors: sqrt(2 - 2s) turns s's 1e-7 rounding into ~5e-4 (golden quirk 2)
ATOL_LNAMD = 1e-6  # fp32 LNAMD vs fp64 reference and vs the torch path (golden README: 1.8e-7)
# bf16/fp16 outputs of LNAMD: one rounding of a unit-row value (half an ulp at 1: 2**-9 / 2**-12).
ATOL_LNAMD_OUT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# bf16 MSM: DESIGN rule, the kernel's error vs fp64 is at most 2x torch's own bf16 error on the same data.
BF16_RATIO = 2.0

COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if COMPILED else "cpu"
SMALL = MutualMinConfig(16, 32, 16, num_stages=2)  # several row, column and K tiles at L=49, C=37; 2 stages: no
# sm_90 stack in the 3-part split mode (3 stages: 8 bytes)


@pytest.fixture(autouse=True, scope="module")
def kernels_ready():  # public name: tests/test_kernels.py star-imports this module
    ok, why = kernels.available()
    assert ok, why


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE)


def _np(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _public_in(x: np.ndarray):
    """Input for the public ops: numpy under the interpreter (numpy in, numpy out is part of the API);
    a CUDA tensor when compiled (a forced kernel backend refuses CPU tensors there)."""
    return x if DEVICE == "cpu" else _t(x)


def _off_diagonal(n: int, length: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)[:, None, :].repeat(length, axis=1)


def _distances(sim: torch.Tensor) -> np.ndarray:
    return np.sqrt(np.clip(2.0 - 2.0 * _np(sim).astype(np.float64), 0.0, None))


# --------------------------------------------------------------------------------------------------
# mutual min (nearest similarity)

SHAPES = [(2, 49, 24), (3, 25, 37), (5, 49, 37), (4, 9, 64), (3, 16, 16)]


@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default", "tiles16x32x16"])
@pytest.mark.parametrize("n, length, c", SHAPES, ids=lambda v: str(v))
def test_mutual_min_fp32_matches_reference(n, length, c, cfg):
    z = unit_rows(n, length, c, np.random.default_rng())
    sim = kernels.nearest_similarity_triton(_t(z), precision="fp32", config=cfg)
    assert sim.shape == (n, length, n) and sim.dtype == torch.float32
    off = _off_diagonal(n, length)
    assert np.isneginf(_np(sim)[~off]).all() and np.isfinite(_np(sim)[off]).all()
    np.testing.assert_allclose(_distances(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_FP32)
    torch_sim = nearest_similarity_torch(torch.from_numpy(z))
    np.testing.assert_allclose(_np(sim)[off], torch_sim.numpy()[off], rtol=0, atol=ATOL_SIM_FP32)


def _sim64(z: np.ndarray) -> np.ndarray:
    n, length, c = z.shape
    flat = z.astype(np.float64).reshape(n * length, c)
    sim = (flat @ flat.T).reshape(n, length, n, length).max(axis=3)
    sim[np.arange(n), :, np.arange(n)] = -np.inf
    return sim


@pytest.mark.parametrize("precision", ["fp32", "fp32-ieee"])
@pytest.mark.parametrize("n, length, c, cfg", [(3, 25, 100, None), (2, 9, 1000, None), (4, 49, 37, SMALL),
                                               (5, 16, 1000, SMALL)], ids=str)
def test_mutual_min_exact_modes_odd_c(n, length, c, cfg, precision):
    """Both exact modes (the bf16-split tensor-core path and IEEE FMA) with C not a multiple of the K block
    (zero-padded by the wrapper): error vs float64 at most 2x torch's own fp32 matmul (TF32 off) on the
    same inputs, plus a floor of 1e-7 for shapes where torch happens to be near exact."""
    z = with_duplicates(unit_rows(n, length, c, np.random.default_rng())) if n >= 4 else \
        unit_rows(n, length, c, np.random.default_rng())
    sim = kernels.nearest_similarity_triton(_t(z), precision=precision, config=cfg)
    off = _off_diagonal(n, length)
    assert np.isneginf(_np(sim)[~off]).all() and np.isfinite(_np(sim)[off]).all()
    ref = _sim64(z)[off]
    err = np.abs(_np(sim).astype(np.float64)[off] - ref).max()
    torch_err = np.abs(nearest_similarity_torch(torch.from_numpy(z)).double().numpy()[off] - ref).max()
    assert err <= 2 * torch_err + 1e-7, (err, torch_err)
    np.testing.assert_allclose(_distances(sim)[off], nearest_distances_reference(z)[off],
                               atol=ATOL_TIES if n >= 4 else ATOL_FP32)


def test_mutual_min_work_counter_and_int32_guard():
    """Work comes from an atomic counter: any grid size gives the same bits (items are independent), and
    launches whose item count would overflow int32 are refused before any work."""
    from musc_fast.kernels import mutual_min as mm

    z = _t(unit_rows(4, 25, 24, np.random.default_rng()))
    zc = z[None, None].contiguous()
    sims = []
    for progs in (1, 3):
        sim = torch.full((1, 4, 25, 4), float("-inf"), device=DEVICE)
        mm._launch(zc, sim, "fp32-ieee", dataclasses.replace(SMALL, block_k=8, progs_per_sm=progs))
        sims.append(sim)
    torch.testing.assert_close(sims[0], sims[1], rtol=0, atol=0)
    assert torch.isfinite(sims[0][0][torch.from_numpy(_off_diagonal(4, 25)).to(DEVICE)]).all()
    assert mm.work_items(1, 200 * 199 // 2, 1369, 128) == 19900 * 11
    with pytest.raises(ValueError, match="exceed int32"):
        mm.work_items(1, 14000 * 13999 // 2, 1369, 64)


@pytest.mark.parametrize("precision", ["fp32", "fp32-ieee", "bf16", "fp16"])
def test_mutual_min_flattened_loop_same_bits(precision):
    """The flattened loop over (column tile, K step) is the same arithmetic as the nested one: same bits,
    on awkward shapes (L not a multiple of the tiles, odd C, a duplicate image), and exact vs float64."""
    z = with_duplicates(unit_rows(4, 49, 37, np.random.default_rng()))
    nest = kernels.nearest_similarity_triton(_t(z), precision=precision, config=SMALL)
    flat = kernels.nearest_similarity_triton(_t(z), precision=precision,
                                             config=dataclasses.replace(SMALL, flatten=True))
    torch.testing.assert_close(flat, nest, rtol=0, atol=0)
    off = _off_diagonal(4, 49)
    if precision.startswith("fp32"):
        ref = _sim64(z)[off]
        torch_err = np.abs(nearest_similarity_torch(torch.from_numpy(z)).double().numpy()[off] - ref).max()
        assert np.abs(_np(flat).astype(np.float64)[off] - ref).max() <= 2 * torch_err + 1e-7
    else:  # rounded operands, exact products, fp32 sums (see test_mutual_min_low_precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        zr = torch.from_numpy(z).to(dtype).double().numpy()
        np.testing.assert_allclose(_np(flat)[off], _sim64(zr)[off], rtol=0, atol=ATOL_SIM_FP32)


@pytest.mark.parametrize("precision", ["fp32", "fp32-ieee", "bf16", "tf32"])
def test_mutual_min_autotune_candidates_agree(precision):
    """Every autotune candidate (GPU tile shapes, both loop forms) computes the same similarities as the
    default: bitwise when compiled (they share BLOCK_K, so each entry is summed in the same order), to
    fp32 rounding under the interpreter (its numpy dot may order a block's sum by the block's shape)."""
    from musc_fast.kernels import mutual_min as mm

    z = _t(unit_rows(3, 49, 40, np.random.default_rng()))  # one partial tile each way, C padded
    sims = [kernels.nearest_similarity_triton(z, precision=precision, config=cfg)
            for cfg in mm.CANDIDATES[precision]]
    assert any(c.flatten for c in mm.CANDIDATES[precision])
    for sim in sims[1:]:
        torch.testing.assert_close(sim, sims[0], rtol=0, atol=0 if COMPILED else ATOL_SIM_FP32)


def test_autotune_candidates_share_block_k():
    from musc_fast.kernels import mutual_min as mm

    for prec, cands in mm.CANDIDATES.items():
        assert len({c.block_k for c in cands}) == 1, prec
        assert cands[0] == mm._DEFAULTS[prec]


def test_first_use_probe_passes_for_the_real_kernels(monkeypatch):
    """The probe of ops.kernel_ok against the torch paths, on the real kernels (interpreter or GPU):
    every kernel and precision passes it (else a correct kernel would be turned off)."""
    from musc_fast import ops

    monkeypatch.setattr(ops, "PROBE_DEVICES", ["cuda", "cpu"])
    monkeypatch.setattr(ops, "_KERNEL_STATE", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        for key in [("lnamd",), ("interval_mean",), ("mutual_min", "fp32"), ("mutual_min", "fp32-ieee"),
                    ("mutual_min", "bf16"), ("mutual_min", "fp16"), ("boxgram", "fp32"), ("boxgram", "bf16")]:
            assert ops.kernel_ok(key, DEVICE), key
    assert all(v is None for v in ops._KERNEL_STATE.values())


def test_mutual_min_negative_similarities_are_not_masked_by_padding():
    """Padded rows/columns of a tile are zero vectors (dot 0). With all true similarities negative, a
    missing mask would report 0 as the maximum."""
    rng = np.random.default_rng()
    base = rng.standard_normal(20)
    base /= np.linalg.norm(base)
    z = np.empty((3, 25, 20), np.float32)
    for i, sign in enumerate([1, -1, 1]):  # image 1 points away from images 0 and 2
        v = sign * base + 0.05 * rng.standard_normal((25, 20))
        z[i] = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = kernels.nearest_similarity_triton(_t(z), config=SMALL)
    assert (_np(sim)[0, :, 1] < -0.5).all() and (_np(sim)[1, :, 0] < -0.5).all()
    off = _off_diagonal(3, 25)
    np.testing.assert_allclose(_distances(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_FP32)


@pytest.mark.parametrize("n", [3, 5])
def test_mutual_min_duplicates(n):
    z = with_duplicates(unit_rows(n, 49, 37, np.random.default_rng()))
    sim = kernels.nearest_similarity_triton(_t(z), config=SMALL)
    off = _off_diagonal(n, 49)
    np.testing.assert_allclose(_distances(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_TIES)
    # Image n-1 is a copy of image 0: each of its patches finds itself (similarity 1) in image 0.
    np.testing.assert_allclose(_np(sim)[n - 1, :, 0], 1.0, atol=ATOL_SIM_FP32)


def test_mutual_min_several_passes_in_one_launch():
    rng = np.random.default_rng()
    zs = np.stack([unit_rows(4, 25, 24, rng) for _ in range(3)])  # [P=3, N, L, C]
    sim = kernels.nearest_similarity_triton(_t(zs), config=SMALL)
    assert sim.shape == (3, 4, 25, 4)
    for p in range(3):
        one = kernels.nearest_similarity_triton(_t(zs[p]), config=SMALL)
        torch.testing.assert_close(sim[p], one, rtol=0, atol=0)


def test_pair_table_covers_every_pair_once():
    from musc_fast.kernels.mutual_min import pair_table

    for n, group in [(2, 8), (7, 3), (20, 8)]:
        pi, pj = (t.numpy() for t in pair_table(n, group, torch.device("cpu")))
        pairs = set(zip(pi.tolist(), pj.tolist()))
        assert len(pairs) == len(pi) == n * (n - 1) // 2 and all(i < j for i, j in pairs)


def _torch_bf16_scores(z: np.ndarray, k_min: int, k_max: int) -> np.ndarray:
    """What torch's own bf16 path computes (bf16 operands, fp32 accumulation, bf16 output, as cuBLAS)."""
    n, length, c = z.shape
    flat = torch.from_numpy(z).bfloat16().reshape(n * length, c)
    sim = (flat @ flat.T).float().view(n, length, n, length).amax(dim=3)
    sim.diagonal(dim1=0, dim2=2).fill_(float("-inf"))
    return interval_mean_from_similarity(sim, k_min, k_max).numpy()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("n, length, c", [(6, 49, 37), (5, 25, 64)], ids=lambda v: str(v))
def test_mutual_min_low_precision(n, length, c, precision):
    rng = np.random.default_rng()
    z = unit_rows(n, length, c, rng)
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    sim = kernels.nearest_similarity_triton(_t(z), precision=precision, config=SMALL)
    out = _np(kernels.interval_mean_triton(sim, k_min, k_max))
    # 1) Mechanics: "rounded operands, exact products, fp32 accumulation", i.e. the fp64 similarities of
    # the rounded Z (whose rows are no longer exactly unit: distances still come from sqrt(2 - 2s)).
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    zr = torch.from_numpy(z).to(dtype).double().reshape(n * length, c)
    sim64 = (zr @ zr.T).view(n, length, n, length).amax(dim=3).numpy()
    sim64[np.arange(n), :, np.arange(n)] = -np.inf
    np.testing.assert_allclose(out, _interval_reference(sim64, k_min, k_max), atol=ATOL_FP32)
    # 2) Accuracy vs the true fp64 scores: within 2x torch's own bf16 error on the same data.
    ref = mutual_scores_reference(z)
    err = np.abs(out - ref).max()
    torch_err = np.abs(_torch_bf16_scores(z, k_min, k_max) - ref).max()
    assert err <= BF16_RATIO * torch_err, (err, torch_err)


# --------------------------------------------------------------------------------------------------
# interval mean


def _interval_reference(sim: np.ndarray, k_min: int, k_max: int) -> np.ndarray:
    """Sort the N-1 distances of each patch (self excluded) and average sorted[k_min:k_max], float64."""
    n, length, _ = sim.shape
    d = np.sqrt(np.clip(2.0 - 2.0 * sim.astype(np.float64), 0.0, None))
    out = np.empty((n, length))
    for i in range(n):
        for p in range(length):
            out[i, p] = np.sort(np.delete(d[i, p], i))[k_min:k_max].mean()
    return out


def _tied_similarities(n: int, length: int, rng, levels: int = 4) -> np.ndarray:
    """[N, L, N] float32 with many exact ties (a few distinct values), -inf on the self entries."""
    sim = (rng.integers(0, levels, size=(n, length, n)) / levels * 1.5 - 0.4).astype(np.float32)
    sim[np.arange(n), :, np.arange(n)] = -np.inf
    return sim


@pytest.mark.parametrize("n", [2, 3, 5, 7, 12])
def test_interval_mean_exact_ties(n):
    rng = np.random.default_rng()
    sim = _tied_similarities(n, 25, rng)
    for k_min, k_max in {(0, 1), (0, max(1, (n - 1) // 3)), (0, n - 1), (min(1, n - 2), n - 1),
                         (n // 3, max(n // 3 + 1, 2 * (n - 1) // 3))}:
        if k_max <= k_min or k_max > n - 1:
            continue
        out = kernels.interval_mean_triton(_t(sim), k_min, k_max)
        assert out.dtype == torch.float64 and out.shape == (n, 25)
        np.testing.assert_allclose(_np(out), _interval_reference(sim, k_min, k_max), rtol=1e-13, atol=1e-14)


def test_interval_mean_continuous_matches_torch_topk_path():
    rng = np.random.default_rng()
    sim = rng.uniform(-0.2, 1.05, size=(9, 49, 9)).astype(np.float32)  # includes s > 1 (distance 0)
    sim[np.arange(9), :, np.arange(9)] = -np.inf
    for k_min, k_max in [(0, 2), (2, 6), (0, 8)]:
        out = _np(kernels.interval_mean_triton(_t(sim), k_min, k_max))
        np.testing.assert_allclose(out, interval_mean_from_similarity(torch.from_numpy(sim), k_min, k_max),
                                   rtol=1e-13, atol=1e-14)


def test_interval_mean_sums_passes_and_accumulates():
    rng = np.random.default_rng()
    sims = np.stack([_tied_similarities(6, 16, rng, levels=9) for _ in range(3)])
    one = [_interval_reference(s, 1, 3) for s in sims]
    out = kernels.interval_mean_triton(_t(sims), 1, 3)
    np.testing.assert_allclose(_np(out), sum(one), rtol=1e-13)
    again = kernels.interval_mean_triton(_t(sims[0]), 1, 3, out=out, accumulate=True)
    assert again is out
    np.testing.assert_allclose(_np(out), sum(one) + one[0], rtol=1e-13)
    out32 = torch.zeros((6, 16), dtype=torch.float32, device=DEVICE)
    kernels.interval_mean_triton(_t(sims[1]), 1, 3, out=out32)
    np.testing.assert_allclose(_np(out32), one[1], rtol=1e-6)


def test_interval_mean_empty_interval_is_nan_and_bad_bounds_raise():
    sim = _t(_tied_similarities(4, 9, np.random.default_rng()))
    assert torch.isnan(kernels.interval_mean_triton(sim, 0, 0)).all()
    with pytest.raises(ValueError, match="outside"):
        kernels.interval_mean_triton(sim, 0, 4)


# --------------------------------------------------------------------------------------------------
# LNAMD


def _tokens(n, g, c, rng):
    # Outlier channels with large offsets and growing per-image scales, like real ViT tokens.
    x = rng.standard_normal((n, g * g, c)) * rng.lognormal(0, 1, c) + rng.normal(0, 5, c)
    return (x * np.arange(1, n + 1)[:, None, None]).astype(np.float32)


@pytest.mark.parametrize("r_list", [[1, 3, 5], [7], [5, 1, 3, 1], [1, 3, 5, 7, 9]], ids=str)
@pytest.mark.parametrize("n, g, c", [(2, 7, 24), (3, 5, 37), (2, 3, 64), (1, 14, 33)], ids=str)
def test_lnamd_matches_reference_and_torch(n, g, c, r_list):
    x = _tokens(n, g, c, np.random.default_rng())
    outs = kernels.lnamd_triton(_t(x), r_list)
    assert len(outs) == len(r_list) and len({id(z) for z in outs}) == len(outs)  # no aliases
    for z, t, r in zip(outs, lnamd_multi_torch(torch.from_numpy(x), r_list), r_list):
        assert z.dtype == torch.float32 and z.shape == x.shape
        np.testing.assert_allclose(_np(z), lnamd_reference(x, r), rtol=0, atol=ATOL_LNAMD)
        np.testing.assert_allclose(_np(z), t.numpy(), rtol=0, atol=ATOL_LNAMD)


def test_lnamd_small_patch_blocks():
    """Programs that own fewer patches than a grid row (halo across program boundaries)."""
    x = _tokens(1, 6, 24, np.random.default_rng())
    for block_p in (1, 4):
        for z, r in zip(kernels.lnamd_triton(_t(x), [1, 3, 5], block_p=block_p), [1, 3, 5]):
            np.testing.assert_allclose(_np(z), lnamd_reference(x, r), rtol=0, atol=ATOL_LNAMD)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lnamd_half_tokens_and_outputs(dtype):
    x = _tokens(3, 7, 40, np.random.default_rng())
    xt = torch.from_numpy(x).to(dtype)
    ref = lnamd_reference(xt.float().numpy(), 3)  # the rounded tokens, normalised in fp32 (SPEC 2)
    z32 = kernels.lnamd_triton(xt.to(DEVICE), [3])[0]
    np.testing.assert_allclose(_np(z32), ref, atol=ATOL_LNAMD)
    z16 = kernels.lnamd_triton(xt.to(DEVICE), [3], out_dtype=dtype)[0]
    assert z16.dtype == dtype
    np.testing.assert_allclose(_np(z16.float()), ref, atol=ATOL_LNAMD_OUT[dtype])


def test_lnamd_errors():
    with pytest.raises(ValueError, match="odd and positive"):
        kernels.lnamd_triton(_t(np.zeros((2, 49, 8), np.float32)), [2])
    with pytest.raises(ValueError, match="square"):
        kernels.lnamd_triton(_t(np.zeros((2, 50, 8), np.float32)), [1])


# --------------------------------------------------------------------------------------------------
# the gate (public ops with MUSC_FAST_MSM / MUSC_FAST_LNAMD)


def test_gate_triton_mutual_scores_and_nearest(monkeypatch):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    assert backend("msm", DEVICE) == "triton"
    rng = np.random.default_rng()
    for n, length, c in [(5, 49, 37), (7, 9, 24)]:
        z = unit_rows(n, length, c, rng)
        out = mutual_scores(_public_in(z))
        assert isinstance(out, np.ndarray if DEVICE == "cpu" else torch.Tensor) and out.dtype in (
            np.float64, torch.float64)
        np.testing.assert_allclose(_np(out), mutual_scores_reference(z), rtol=0, atol=ATOL_FP32)
    z = _t(with_duplicates(unit_rows(6, 25, 24, rng)))
    out = mutual_scores(z, (1, 4))
    assert isinstance(out, torch.Tensor) and out.device.type == DEVICE
    np.testing.assert_allclose(_np(out), mutual_scores_reference(_np(z), (1, 4)), atol=ATOL_TIES)


@pytest.mark.parametrize("name", ["n5", "n6", "n12", "dup"])
def test_gate_triton_golden_msm(golden, monkeypatch, name):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    g = golden("golden_msm")
    out = _np(mutual_scores(_public_in(g[f"{name}_Z"]), compat=True))
    atol = ATOL_TIES if name == "dup" else ATOL_FP32
    np.testing.assert_allclose(out, g[f"{name}_scores"], rtol=0, atol=atol)


def test_gate_triton_compat_nan_for_small_n(golden, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    g = golden("golden_msm")
    for n in (1, 2, 4):
        assert np.isnan(_np(mutual_scores(_public_in(g[f"n{n}_Z"]), compat=True))).all()
    with pytest.warns(SmallBatchWarning):
        out = _np(mutual_scores(_public_in(g["n3_Z"])))
    np.testing.assert_allclose(out, nearest_distances_reference(g["n3_Z"]).min(axis=2), atol=ATOL_FP32)


def test_gate_triton_lnamd(golden, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_LNAMD", "triton")
    assert backend("lnamd", DEVICE) == "triton"
    g = golden("golden_lnamd")
    for prefix in ("g37", "g7"):  # g7 last: its tokens are reused below
        tokens = _public_in(np.ascontiguousarray(g[f"{prefix}_tokens"][0][:, 1:]))  # layer 0, no CLS
        outs = [_np(z) for z in lnamd_multi(tokens, [1, 3, 5])]
        for out, r in zip(outs, [1, 3, 5]):
            np.testing.assert_allclose(out, g[f"{prefix}_out_r{r}"][:, :, 0], rtol=0, atol=ATOL_LNAMD)
    np.testing.assert_allclose(_np(lnamd(tokens, 3)), outs[1], rtol=0, atol=0)  # single-r entry


@pytest.mark.parametrize("op, value", [("msm", "cuda"), ("lnamd", "faiss"), ("msm", "")])
def test_gate_rejects_unknown_values(monkeypatch, op, value):
    monkeypatch.setenv(f"MUSC_FAST_{op.upper()}", value)
    with pytest.raises(ValueError, match="is not one of"):
        backend(op, DEVICE)


def test_gate_auto_and_torch(monkeypatch):
    monkeypatch.delenv("MUSC_FAST_MSM", raising=False)
    assert backend("msm", "cpu") == "torch"  # auto: kernels only for CUDA tensors
    assert backend("msm", "cpu", torch.float32) == "torch"
    monkeypatch.setenv("MUSC_FAST_MSM", "torch")
    assert backend("msm", DEVICE) == "torch"
    if COMPILED:
        monkeypatch.delenv("MUSC_FAST_MSM")
        assert backend("msm", "cuda", torch.float32) == "triton"
        assert backend("msm", "cuda", torch.float64) == "torch"  # no float64 kernel


def test_gate_triton_without_interpreter_or_gpu_is_an_error(monkeypatch):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            backend("msm", "cpu")
    else:
        assert kernels.available()[0] is False
        with pytest.raises(RuntimeError, match="cannot run here"):
            backend("msm", "cpu")


def test_import_does_not_import_triton():
    code = ("import sys, numpy as np, musc_fast, musc_fast.ops as o; "
            "o.mutual_scores(np.random.rand(6, 9, 8).astype('float32')); "
            "o.lnamd(np.ones((2, 9, 8), 'float32'), 3); "
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('musc_fast.kernels.')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSC_FAST_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == "[]", res.stdout


# --------------------------------------------------------------------------------------------------
# FAISS provider


def test_faiss_nearest_similarity_and_gate(monkeypatch):
    ok, why = kernels.faiss_available()
    if not ok:
        pytest.skip(why)
    rng = np.random.default_rng()
    z = with_duplicates(unit_rows(5, 49, 37, rng))
    sim = kernels.nearest_similarity_faiss(torch.from_numpy(z))
    off = _off_diagonal(5, 49)
    assert sim.shape == (5, 49, 5) and np.isneginf(sim.numpy()[~off]).all()
    np.testing.assert_allclose(_distances(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_TIES)
    monkeypatch.setenv("MUSC_FAST_MSM", "faiss")
    assert backend("msm", "cpu") == "faiss"
    z = unit_rows(6, 25, 24, rng)
    np.testing.assert_allclose(mutual_scores(z), mutual_scores_reference(z), rtol=0, atol=ATOL_FP32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        np.testing.assert_allclose(mutual_scores(z[:3]), mutual_scores_reference(z[:3]), atol=ATOL_FP32)


# --------------------------------------------------------------------------------------------------
# Hopper build (offline): every kernel compiles for sm_90 at its GPU launch parameters


def test_kernels_build_for_sm90_without_spills():
    """Compile for sm_90 without a GPU (a subprocess, so the interpreter setting does not apply) and
    check what the H200 would run: wgmma for 16-bit MSM, a cp.async pipeline, red.max for the column
    maxima, no register spills anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, torch; from musc_fast.kernels import _sm90 as s; "
            "from musc_fast.kernels import nearest_similarity_triton as f; "
            "odd = s.preflight([lambda: f(torch.zeros(4, 1369, 1000), precision='bf16'), "
            "lambda: f(torch.zeros(4, 1369, 1000), precision='fp16'), "
            "lambda: f(torch.zeros(4, 1369, 100), precision='fp32'), "
            "lambda: f(torch.zeros(4, 1369, 100), precision='fp32-ieee')]); "
            "print(json.dumps({"
            "'bf16': s.mutual_min_report('bf16'), 'fp32': s.mutual_min_report('fp32'), "
            "'fp32_ieee': s.mutual_min_report('fp32-ieee'), "
            "**{f'odd_c_{i}': r for i, r in enumerate(odd)}, "
            "'interval': s.interval_mean_report(200), 'interval_n12': s.interval_mean_report(12), "
            "'interval_n9': s.interval_mean_report(9), 'lnamd': s.lnamd_report(1024), "
            "**{f'flat_{p}': s.mutual_min_report(p, c) for p, cs in __import__("
            "'musc_fast.kernels.mutual_min', fromlist=['x']).CANDIDATES.items() if p in ('bf16', 'fp32') "
            "for c in cs if c.flatten}, "
            "**{f'boxgram_{p}_{k}': v for p in ('bf16', 'fp32', 'fp32-ieee') "
            "for k, v in s.boxgram_report(p).items()}}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:
        if "cuobjdump" in res.stderr or "No such file" in res.stderr:
            pytest.skip(f"this Triton install cannot build sm_90 offline: {res.stderr[-300:]}")
        raise AssertionError(res.stderr[-3000:])
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    for name, r in rep.items():
        assert r["stack"] == 0 and r["LDL"] == 0 and r["STL"] == 0, (name, r)
        assert r["shared"] <= 227 * 1024, (name, r)
    assert rep["bf16"]["HGMMA"] > 0 and rep["bf16"]["LDGSTS"] > 0, rep["bf16"]
    # The flattened-loop candidates stay on wgmma + cp.async (checked spill-free above).
    assert rep["flat_bf16"]["HGMMA"] > 0 and rep["flat_bf16"]["LDGSTS"] > 0, rep["flat_bf16"]
    assert rep["flat_fp32"]["HGMMA"] >= 6, rep["flat_fp32"]
    # Exact mode on tensor cores (bf16 split: 6 products); fp32-ieee on the FMA units (TF32 really off).
    assert rep["fp32"]["HGMMA"] >= 6 and rep["fp32"]["LDGSTS"] > 0, rep["fp32"]
    assert rep["fp32_ieee"]["HGMMA"] == 0 and rep["fp32_ieee"]["FFMA"] > 0, rep["fp32_ieee"]
    # Column maxima through red.max; the only ATOMs are the work counter's (returns a value).
    assert rep["bf16"]["RED"] > 0 and rep["bf16"]["ATOM"] <= 2, rep["bf16"]
    # C not a multiple of 16/32 (zero-padded to the K block): 4 launches, spill-free (checked above) and
    # on the cp.async pipeline.
    odd = [r for k, r in rep.items() if k.startswith("odd_c_")]
    assert len(odd) == 4 and all("error" not in r and r["LDGSTS"] > 0 for r in odd), odd
    # One-Gram kernels (kernels/boxgram.py): the Gram on wgmma in bf16 and fp32 (split), FFMA in fp32-ieee;
    # every degree's maxima through red.max; the filters of r = 3 and 5 present and spill-free (above).
    box = {k[len("boxgram_"):]: r for k, r in rep.items() if k.startswith("boxgram_")}
    assert {"bf16_gram", "bf16_box_rows", "bf16_box_cols_r3", "bf16_box_cols_r5", "fp32_gram"} <= set(box)
    assert box["bf16_gram"]["HGMMA"] > 0 and box["bf16_gram"]["LDGSTS"] > 0, box["bf16_gram"]
    assert box["fp32_gram"]["HGMMA"] >= 6, box["fp32_gram"]  # exact mode: the bf16 split on wgmma
    assert box["fp32-ieee_gram"]["HGMMA"] == 0 and box["fp32-ieee_gram"]["FFMA"] > 0, box["fp32-ieee_gram"]
    for name in ("gram", "box_cols_r3", "box_cols_r5"):
        assert box[f"bf16_{name}"]["RED"] > 0 and box[f"bf16_{name}"]["ATOM"] == 0, (name, box[f"bf16_{name}"])


# --------------------------------------------------------------------------------------------------
# real GPU, larger shapes (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("n, length, c", [(12, 1369, 1024), (24, 196, 768), (7, 1369, 24)], ids=str)
def test_gpu_mutual_scores_paper_grid(n, length, c):
    z = torch.from_numpy(unit_rows(n, length, c, np.random.default_rng())).cuda()
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    ref_sim = nearest_similarity_torch(z)  # cuBLAS fp32, TF32 off
    sim = kernels.nearest_similarity_triton(z)
    off = torch.from_numpy(_off_diagonal(n, length)).cuda()
    assert (sim[off] - ref_sim[off]).abs().max().item() <= ATOL_SIM_FP32_C1024
    out = kernels.interval_mean_triton(sim, k_min, k_max)
    ref = interval_mean_from_similarity(ref_sim, k_min, k_max)
    assert (out - ref).abs().max().item() <= ATOL_FP32
    bf = kernels.interval_mean_triton(kernels.nearest_similarity_triton(z, precision="bf16"), k_min, k_max)
    sim_t16 = nearest_similarity_torch(z, precision="bf16")
    torch_err = (interval_mean_from_similarity(sim_t16, k_min, k_max) - ref).abs().max().item()
    assert (bf - ref).abs().max().item() <= BF16_RATIO * torch_err + ATOL_FP32


@pytest.mark.gpu
def test_gpu_lnamd_paper_grid():
    x = torch.from_numpy(_tokens(4, 37, 1024, np.random.default_rng())).cuda().half()
    for z, t in zip(kernels.lnamd_triton(x, [1, 3, 5]), lnamd_multi_torch(x, [1, 3, 5])):
        assert (z - t).abs().max().item() <= ATOL_LNAMD


@pytest.mark.gpu
def test_gpu_interval_mean_large_n():
    rng = np.random.default_rng()
    sim = torch.from_numpy(rng.uniform(-0.5, 1.0, size=(200, 64, 200)).astype(np.float32)).cuda()
    sim.diagonal(dim1=0, dim2=2).fill_(float("-inf"))
    out = kernels.interval_mean_triton(sim, 0, 59)
    torch.testing.assert_close(out, interval_mean_from_similarity(sim, 0, 59), rtol=1e-12, atol=1e-13)
