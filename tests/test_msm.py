"""MSM: golden parity, fast torch path vs the float64 reference, interval rules, small-N guard."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from musc_fast import kernels
from musc_fast.ops import SmallBatchWarning, backend, interval_bounds, mutual_scores, nearest_similarity
from musc_fast.ops.msm import interval_mean_from_similarity, mutual_scores_torch, nearest_similarity_torch
from musc_fast.ops.reference import mutual_scores_reference, nearest_distances_reference
from tests.helpers import (
    ATOL_FP32,
    ATOL_SIM_FP32,
    ATOL_SIM_FP32_C1024,
    ATOL_TIES,
    BF16_RATIO,
    COMPILED,
    DEVICE,
    as_numpy,
    distances_of,
    interval_mean_reference,
    off_diagonal,
    on_device,
    public_input,
    unit_rows,
    with_duplicates,
)

try:  # the kernel's tile config (importing it imports triton); without triton the triton tests skip
    from musc_fast.kernels.mutual_min import MutualMinConfig

    # several row, column and K tiles at L=49, C=37; 2 stages: no sm_90 stack in the 3-part split mode
    SMALL = MutualMinConfig(16, 32, 16, num_stages=2)
except ImportError:
    SMALL = None


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 12, 40])
def test_golden_msm_compat(golden, n):
    g = golden("golden_msm")
    out = mutual_scores(g[f"n{n}_Z"], compat=True)
    ref = g[f"n{n}_scores"]
    assert out.dtype == np.float64 and out.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))  # N <= 4: all NaN, exactly
    if not np.isnan(ref).all():
        np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL_FP32)


@pytest.mark.parametrize("case, topmin", [("count5", (0, 5)), ("interval_2_6", (2, 6)),
                                          ("swapped_05_01", (0.5, 0.1))])
def test_golden_msm_intervals(golden, case, topmin):
    g = golden("golden_msm")
    np.testing.assert_allclose(mutual_scores(g["n12_Z"], topmin), g[f"n12_{case}_scores"], atol=ATOL_FP32)


def test_golden_msm_duplicates(golden):
    g = golden("golden_msm")
    np.testing.assert_allclose(mutual_scores(g["dup_Z"]), g["dup_scores"], atol=ATOL_TIES)


def test_reference_reproduces_golden(golden):
    """The oracle itself agrees with the original code, so agreeing with the oracle means parity."""
    g = golden("golden_msm")
    np.testing.assert_allclose(mutual_scores_reference(g["n12_Z"]), g["n12_scores"], atol=ATOL_FP32)


@pytest.mark.parametrize("n, length, c", [(2, 49, 64), (3, 49, 37), (4, 49, 100), (5, 49, 24), (6, 49, 64),
                                          (40, 49, 24), (2, 1369, 8), (3, 1369, 12), (5, 1369, 8),
                                          (40, 1369, 8)],
                         ids=lambda v: str(v))
def test_fast_equals_reference(n, length, c):
    rng = np.random.default_rng()
    z = unit_rows(n, length, c, rng)
    ref = mutual_scores_reference(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        out = mutual_scores(z)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL_FP32)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_duplicates_and_ties(n):
    z = with_duplicates(unit_rows(n, 49, 33, np.random.default_rng()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        out = mutual_scores(z)
    np.testing.assert_allclose(out, mutual_scores_reference(z), atol=ATOL_TIES)


def test_nearest_similarity_matches_reference_distances():
    z = unit_rows(5, 49, 20, np.random.default_rng())
    sim = nearest_similarity(torch.from_numpy(z))
    assert sim.shape == (5, 49, 5) and torch.isneginf(sim.diagonal(dim1=0, dim2=2)).all()
    dist = np.sqrt(np.clip(2 - 2 * sim.double().numpy(), 0, None))
    ref = nearest_distances_reference(z)
    off = ~np.eye(5, dtype=bool)[:, None, :].repeat(49, axis=1)
    np.testing.assert_allclose(dist[off], ref[off], atol=ATOL_FP32)


@pytest.mark.parametrize("block_elems", [49 * 49, 3 * 49 * 49, 1 << 20])
def test_chunking_does_not_change_results(block_elems):
    z = torch.from_numpy(unit_rows(7, 49, 16, np.random.default_rng()))
    base = mutual_scores_torch(z)
    torch.testing.assert_close(mutual_scores_torch(z, block_elems=block_elems), base, rtol=0, atol=0)


def test_interval_rules():
    assert interval_bounds(199, (0.0, 0.3)) == (0, 59)
    assert interval_bounds(11, (2, 6)) == (2, 6)
    assert interval_bounds(11, (0.5, 0.1)) == (1, 5)  # floor(5.5)=5, floor(1.1)=1, swapped
    assert interval_bounds(3, (0.0, 0.3), compat=True) == (0, 0)
    with pytest.warns(SmallBatchWarning):
        assert interval_bounds(3, (0.0, 0.3)) == (0, 1)
    assert interval_bounds(5, (0, 50)) == (0, 5)  # counts beyond N-1 are clamped
    with pytest.raises(ValueError, match="at least 2 images"):
        interval_bounds(0)


def test_small_batch_guard_gives_finite_scores_and_warns():
    z = unit_rows(3, 49, 16, np.random.default_rng())
    with pytest.warns(SmallBatchWarning):
        out = mutual_scores(z)
    assert np.isfinite(out).all()
    # One image averaged: the nearest other image's distance.
    a = nearest_distances_reference(z)
    np.testing.assert_allclose(out, a.min(axis=2), atol=ATOL_FP32)
    assert np.isnan(mutual_scores(z, compat=True)).all()


def test_single_image_is_an_error():
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_scores(unit_rows(1, 49, 8, np.random.default_rng()))


def test_tensor_in_tensor_out():
    z = torch.from_numpy(unit_rows(6, 49, 8, np.random.default_rng()))
    out = mutual_scores(z)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (6, 49)


@pytest.mark.parametrize("c", [100, 1000, 1024])
def test_bf16_split_product_within_twice_torch_fp32_error(c):
    """The exact Triton mode's arithmetic (three bf16 parts, six products, fp32 sums; emulated in torch,
    bf16 products being exact in fp32 as on the tensor cores) against float64: at most 2x the error of
    torch's own fp32 matmul (TF32 off) on the same unit rows, at the paper's C."""
    from musc_fast.ops.msm import bf16_split, split_product

    z = torch.from_numpy(unit_rows(2, 196, c, np.random.default_rng()))
    a, b = z[0], z[1]
    parts = bf16_split(a)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, *a.shape)
    assert (parts.double().sum(0) - a.double()).abs().max().item() <= 2.0 ** -24 * a.abs().max().item()
    ref = a.double() @ b.double().T
    err = (split_product(a, b.T).double() - ref).abs().max().item()
    torch_err = ((a @ b.T).double() - ref).abs().max().item()
    assert err <= 2 * torch_err, (err, torch_err)


# --- the Triton mutual-min kernel, directly and through the gate, and the FAISS provider ----------
# (under the Triton interpreter on CPU tensors at tiny shapes; compiled on a GPU, where ``gpu`` adds larger)


KERNEL_SHAPES = [(2, 49, 24), (3, 25, 37), (5, 49, 37), (4, 9, 64), (3, 16, 16)]


@pytest.mark.triton
@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default", "tiles16x32x16"])
@pytest.mark.parametrize("n, length, c", KERNEL_SHAPES, ids=lambda v: str(v))
def test_mutual_min_fp32_matches_reference(n, length, c, cfg, rng):
    z = unit_rows(n, length, c, rng)
    sim = kernels.nearest_similarity_triton(on_device(z), precision="fp32", config=cfg)
    assert sim.shape == (n, length, n) and sim.dtype == torch.float32
    off = off_diagonal(n, length)
    assert np.isneginf(as_numpy(sim)[~off]).all() and np.isfinite(as_numpy(sim)[off]).all()
    np.testing.assert_allclose(distances_of(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_FP32)
    torch_sim = nearest_similarity_torch(torch.from_numpy(z))
    np.testing.assert_allclose(as_numpy(sim)[off], torch_sim.numpy()[off], rtol=0, atol=ATOL_SIM_FP32)


def _sim64(z: np.ndarray) -> np.ndarray:
    n, length, c = z.shape
    flat = z.astype(np.float64).reshape(n * length, c)
    sim = (flat @ flat.T).reshape(n, length, n, length).max(axis=3)
    sim[np.arange(n), :, np.arange(n)] = -np.inf
    return sim


@pytest.mark.triton
@pytest.mark.parametrize("precision", ["fp32", "fp32-ieee"])
@pytest.mark.parametrize("n, length, c, cfg", [(3, 25, 100, None), (2, 9, 1000, None), (4, 49, 37, SMALL),
                                               (5, 16, 1000, SMALL)], ids=str)
def test_mutual_min_exact_modes_odd_c(n, length, c, cfg, precision, rng):
    """Both exact modes (the bf16-split tensor-core path and IEEE FMA) with C not a multiple of the K block
    (zero-padded by the wrapper): error vs float64 at most 2x torch's own fp32 matmul (TF32 off) on the
    same inputs, plus a floor of 1e-7 for shapes where torch happens to be near exact."""
    z = with_duplicates(unit_rows(n, length, c, rng)) if n >= 4 else \
        unit_rows(n, length, c, rng)
    sim = kernels.nearest_similarity_triton(on_device(z), precision=precision, config=cfg)
    off = off_diagonal(n, length)
    assert np.isneginf(as_numpy(sim)[~off]).all() and np.isfinite(as_numpy(sim)[off]).all()
    ref = _sim64(z)[off]
    err = np.abs(as_numpy(sim).astype(np.float64)[off] - ref).max()
    torch_err = np.abs(nearest_similarity_torch(torch.from_numpy(z)).double().numpy()[off] - ref).max()
    assert err <= 2 * torch_err + 1e-7, (err, torch_err)
    np.testing.assert_allclose(distances_of(sim)[off], nearest_distances_reference(z)[off],
                               atol=ATOL_TIES if n >= 4 else ATOL_FP32)


@pytest.mark.triton
def test_mutual_min_work_counter_and_int32_guard(rng):
    """Work comes from an atomic counter: any grid size gives the same bits (items are independent), and
    launches whose item count would overflow int32 are refused before any work."""
    from musc_fast.kernels import mutual_min as mm

    z = on_device(unit_rows(4, 25, 24, rng))
    zc = z[None, None].contiguous()
    sims = []
    for progs in (1, 3):
        sim = torch.full((1, 4, 25, 4), float("-inf"), device=DEVICE)
        mm._launch(zc, sim, "fp32-ieee", dataclasses.replace(SMALL, block_k=8, progs_per_sm=progs))
        sims.append(sim)
    torch.testing.assert_close(sims[0], sims[1], rtol=0, atol=0)
    assert torch.isfinite(sims[0][0][torch.from_numpy(off_diagonal(4, 25)).to(DEVICE)]).all()
    assert mm.work_items(1, 200 * 199 // 2, 1369, 128) == 19900 * 11
    with pytest.raises(ValueError, match="exceed int32"):
        mm.work_items(1, 14000 * 13999 // 2, 1369, 64)


@pytest.mark.triton
@pytest.mark.parametrize("precision", ["fp32", "fp32-ieee", "bf16", "fp16"])
def test_mutual_min_flattened_loop_same_bits(precision, rng):
    """The flattened loop over (column tile, K step) is the same arithmetic as the nested one: same bits,
    on awkward shapes (L not a multiple of the tiles, odd C, a duplicate image), and exact vs float64."""
    z = with_duplicates(unit_rows(4, 49, 37, rng))
    nest = kernels.nearest_similarity_triton(on_device(z), precision=precision, config=SMALL)
    flat = kernels.nearest_similarity_triton(on_device(z), precision=precision,
                                             config=dataclasses.replace(SMALL, flatten=True))
    torch.testing.assert_close(flat, nest, rtol=0, atol=0)
    off = off_diagonal(4, 49)
    if precision.startswith("fp32"):
        ref = _sim64(z)[off]
        torch_err = np.abs(nearest_similarity_torch(torch.from_numpy(z)).double().numpy()[off] - ref).max()
        assert np.abs(as_numpy(flat).astype(np.float64)[off] - ref).max() <= 2 * torch_err + 1e-7
    else:  # rounded operands, exact products, fp32 sums (see test_mutual_min_low_precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        zr = torch.from_numpy(z).to(dtype).double().numpy()
        np.testing.assert_allclose(as_numpy(flat)[off], _sim64(zr)[off], rtol=0, atol=ATOL_SIM_FP32)


@pytest.mark.triton
@pytest.mark.parametrize("precision", ["fp32", "fp32-ieee", "bf16", "tf32"])
def test_mutual_min_autotune_candidates_agree(precision, rng):
    """Every autotune candidate (GPU tile shapes, both loop forms) computes the same similarities as the
    default: bitwise when compiled (they share BLOCK_K, so each entry is summed in the same order), to
    fp32 rounding under the interpreter (its numpy dot may order a block's sum by the block's shape)."""
    from musc_fast.kernels import mutual_min as mm

    z = on_device(unit_rows(3, 49, 40, rng))  # one partial tile each way, C padded
    sims = [kernels.nearest_similarity_triton(z, precision=precision, config=cfg)
            for cfg in mm.CANDIDATES[precision]]
    assert any(c.flatten for c in mm.CANDIDATES[precision])
    for sim in sims[1:]:
        torch.testing.assert_close(sim, sims[0], rtol=0, atol=0 if COMPILED else ATOL_SIM_FP32)


@pytest.mark.triton
def test_autotune_candidates_share_block_k():
    from musc_fast.kernels import mutual_min as mm

    for prec, cands in mm.CANDIDATES.items():
        assert len({c.block_k for c in cands}) == 1, prec
        assert cands[0] == mm._DEFAULTS[prec]


@pytest.mark.triton
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


@pytest.mark.triton
def test_mutual_min_negative_similarities_are_not_masked_by_padding(rng):
    """Padded rows/columns of a tile are zero vectors (dot 0). With all true similarities negative, a
    missing mask would report 0 as the maximum."""
    base = rng.standard_normal(20)
    base /= np.linalg.norm(base)
    z = np.empty((3, 25, 20), np.float32)
    for i, sign in enumerate([1, -1, 1]):  # image 1 points away from images 0 and 2
        v = sign * base + 0.05 * rng.standard_normal((25, 20))
        z[i] = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = kernels.nearest_similarity_triton(on_device(z), config=SMALL)
    assert (as_numpy(sim)[0, :, 1] < -0.5).all() and (as_numpy(sim)[1, :, 0] < -0.5).all()
    off = off_diagonal(3, 25)
    np.testing.assert_allclose(distances_of(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_FP32)


@pytest.mark.triton
@pytest.mark.parametrize("n", [3, 5])
def test_mutual_min_duplicates(n, rng):
    z = with_duplicates(unit_rows(n, 49, 37, rng))
    sim = kernels.nearest_similarity_triton(on_device(z), config=SMALL)
    off = off_diagonal(n, 49)
    np.testing.assert_allclose(distances_of(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_TIES)
    # Image n-1 is a copy of image 0: each of its patches finds itself (similarity 1) in image 0.
    np.testing.assert_allclose(as_numpy(sim)[n - 1, :, 0], 1.0, atol=ATOL_SIM_FP32)


@pytest.mark.triton
def test_mutual_min_several_passes_in_one_launch(rng):
    zs = np.stack([unit_rows(4, 25, 24, rng) for _ in range(3)])  # [P=3, N, L, C]
    sim = kernels.nearest_similarity_triton(on_device(zs), config=SMALL)
    assert sim.shape == (3, 4, 25, 4)
    for p in range(3):
        one = kernels.nearest_similarity_triton(on_device(zs[p]), config=SMALL)
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


@pytest.mark.triton
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("n, length, c", [(6, 49, 37), (5, 25, 64)], ids=lambda v: str(v))
def test_mutual_min_low_precision(n, length, c, precision, rng):
    z = unit_rows(n, length, c, rng)
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    sim = kernels.nearest_similarity_triton(on_device(z), precision=precision, config=SMALL)
    out = as_numpy(kernels.interval_mean_triton(sim, k_min, k_max))
    # 1) Mechanics: "rounded operands, exact products, fp32 accumulation", i.e. the fp64 similarities of
    # the rounded Z (whose rows are no longer exactly unit: distances still come from sqrt(2 - 2s)).
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    zr = torch.from_numpy(z).to(dtype).double().reshape(n * length, c)
    sim64 = (zr @ zr.T).view(n, length, n, length).amax(dim=3).numpy()
    sim64[np.arange(n), :, np.arange(n)] = -np.inf
    np.testing.assert_allclose(out, interval_mean_reference(sim64, k_min, k_max), atol=ATOL_FP32)
    # 2) Accuracy vs the true fp64 scores: within 2x torch's own bf16 error on the same data.
    ref = mutual_scores_reference(z)
    err = np.abs(out - ref).max()
    torch_err = np.abs(_torch_bf16_scores(z, k_min, k_max) - ref).max()
    assert err <= BF16_RATIO * torch_err, (err, torch_err)


@pytest.mark.triton
def test_gate_triton_mutual_scores_and_nearest(monkeypatch, rng):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    assert backend("msm", DEVICE) == "triton"
    for n, length, c in [(5, 49, 37), (7, 9, 24)]:
        z = unit_rows(n, length, c, rng)
        out = mutual_scores(public_input(z))
        assert isinstance(out, np.ndarray if DEVICE == "cpu" else torch.Tensor) and out.dtype in (
            np.float64, torch.float64)
        np.testing.assert_allclose(as_numpy(out), mutual_scores_reference(z), rtol=0, atol=ATOL_FP32)
    z = on_device(with_duplicates(unit_rows(6, 25, 24, rng)))
    out = mutual_scores(z, (1, 4))
    assert isinstance(out, torch.Tensor) and out.device.type == DEVICE
    np.testing.assert_allclose(as_numpy(out), mutual_scores_reference(as_numpy(z), (1, 4)), atol=ATOL_TIES)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["n5", "n6", "n12", "dup"])
def test_gate_triton_golden_msm(golden, monkeypatch, name):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    g = golden("golden_msm")
    out = as_numpy(mutual_scores(public_input(g[f"{name}_Z"]), compat=True))
    atol = ATOL_TIES if name == "dup" else ATOL_FP32
    np.testing.assert_allclose(out, g[f"{name}_scores"], rtol=0, atol=atol)


@pytest.mark.triton
def test_gate_triton_compat_nan_for_small_n(golden, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    g = golden("golden_msm")
    for n in (1, 2, 4):
        assert np.isnan(as_numpy(mutual_scores(public_input(g[f"n{n}_Z"]), compat=True))).all()
    with pytest.warns(SmallBatchWarning):
        out = as_numpy(mutual_scores(public_input(g["n3_Z"])))
    np.testing.assert_allclose(out, nearest_distances_reference(g["n3_Z"]).min(axis=2), atol=ATOL_FP32)


def test_faiss_nearest_similarity_and_gate(monkeypatch, rng):
    ok, why = kernels.faiss_available()
    if not ok:
        pytest.skip(why)
    z = with_duplicates(unit_rows(5, 49, 37, rng))
    sim = kernels.nearest_similarity_faiss(torch.from_numpy(z))
    off = off_diagonal(5, 49)
    assert sim.shape == (5, 49, 5) and np.isneginf(sim.numpy()[~off]).all()
    np.testing.assert_allclose(distances_of(sim)[off], nearest_distances_reference(z)[off], atol=ATOL_TIES)
    monkeypatch.setenv("MUSC_FAST_MSM", "faiss")
    assert backend("msm", "cpu") == "faiss"
    z = unit_rows(6, 25, 24, rng)
    np.testing.assert_allclose(mutual_scores(z), mutual_scores_reference(z), rtol=0, atol=ATOL_FP32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        np.testing.assert_allclose(mutual_scores(z[:3]), mutual_scores_reference(z[:3]), atol=ATOL_FP32)


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("n, length, c", [(12, 1369, 1024), (24, 196, 768), (7, 1369, 24)], ids=str)
def test_gpu_mutual_scores_paper_grid(n, length, c, rng):
    z = torch.from_numpy(unit_rows(n, length, c, rng)).cuda()
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    ref_sim = nearest_similarity_torch(z)  # cuBLAS fp32, TF32 off
    sim = kernels.nearest_similarity_triton(z)
    off = torch.from_numpy(off_diagonal(n, length)).cuda()
    assert (sim[off] - ref_sim[off]).abs().max().item() <= ATOL_SIM_FP32_C1024
    out = kernels.interval_mean_triton(sim, k_min, k_max)
    ref = interval_mean_from_similarity(ref_sim, k_min, k_max)
    assert (out - ref).abs().max().item() <= ATOL_FP32
    bf = kernels.interval_mean_triton(kernels.nearest_similarity_triton(z, precision="bf16"), k_min, k_max)
    sim_t16 = nearest_similarity_torch(z, precision="bf16")
    torch_err = (interval_mean_from_similarity(sim_t16, k_min, k_max) - ref).abs().max().item()
    assert (bf - ref).abs().max().item() <= BF16_RATIO * torch_err + ATOL_FP32
