"""MSM: golden parity, fast torch path vs the float64 reference, interval rules, small-N guard."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from musc_fast.ops import SmallBatchWarning, interval_bounds, mutual_scores, nearest_similarity
from musc_fast.ops.msm import mutual_scores_torch
from musc_fast.ops.reference import mutual_scores_reference, nearest_distances_reference
from tests.helpers import unit_rows, with_duplicates

# fp32 matmul similarities -> distances: the golden README measured 1.1e-6; the bar is 1e-5.
ATOL_FP32 = 1e-5
# Identical unit vectors: sqrt of fp32 rounding residue is ~1e-4..6e-4, not 0 (golden README quirk 2).
ATOL_TIES = 1e-3


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
