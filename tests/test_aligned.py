"""Aligned parts (MuSc issue 52): the windowed nearest-neighbour search vs its float64 reference, both
torch paths (masked product, grid shifts), the limits w = 0 and w >= G - 1, config and pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast import MuScConfig, score_features
from musc_fast.bank import Bank
from musc_fast.engine import full_similarity, score_pass
from musc_fast.memory import MemoryPlan
from musc_fast.ops import interval_bounds, interval_mean_from_similarity, lnamd, mutual_scores
from musc_fast.ops.msm import (
    cross_similarity_torch,
    nearest_similarity_rows,
    nearest_similarity_torch,
    use_window_shifts,
)
from musc_fast.ops.reference import mutual_scores_aligned_reference, mutual_scores_reference
from tests.helpers import unit_rows
from tests.production_support import fake_config, random_layers

ATOL_FP32 = 1e-5


def _scores(sim, n):
    k_min, k_max = interval_bounds(n - 1)
    return interval_mean_from_similarity(sim, k_min, k_max).numpy()


@pytest.mark.parametrize("window", [0, 1, 2, 4])
def test_both_torch_paths_equal_reference(window):
    n, g, c = 6, 7, 12
    z = torch.from_numpy(unit_rows(n, g * g, c, np.random.default_rng()))
    ref = mutual_scores_aligned_reference(z.numpy(), window)
    masked = nearest_similarity_torch(z, window=window, block_elems=2 * g ** 4)
    shifted = nearest_similarity_rows(z, 0, n, window=window)  # the shift path whatever the size
    shifted_blocks = torch.cat([nearest_similarity_rows(z, i, min(n, i + 4), window=window, block_elems=100)
                                for i in range(0, n, 4)])
    for sim in (masked, shifted, shifted_blocks):
        np.testing.assert_allclose(_scores(sim, n), ref, rtol=0, atol=ATOL_FP32)
    np.testing.assert_allclose(score_pass(z, window=window).numpy(), ref, rtol=0, atol=ATOL_FP32)


def test_shift_rule():
    assert use_window_shifts(0, 49) and use_window_shifts(1, 49) and not use_window_shifts(2, 49)
    assert use_window_shifts(5, 1369) and not use_window_shifts(9, 1369)


def test_large_window_is_the_full_search():
    n, g = 6, 5
    z = torch.from_numpy(unit_rows(n, g * g, 8, np.random.default_rng()))
    full = mutual_scores(z).numpy()
    np.testing.assert_allclose(mutual_scores_aligned_reference(z.numpy(), g - 1),
                               mutual_scores_reference(z.numpy()), rtol=0, atol=1e-12)
    for w in (g - 1, g + 3):
        np.testing.assert_allclose(score_pass(z, window=w).numpy(), full, rtol=0, atol=1e-6)
        np.testing.assert_allclose(_scores(nearest_similarity_rows(z, 0, n, window=w), n), full, rtol=0,
                                   atol=1e-6)


def test_zero_window_is_same_position_distance():
    n, length = 7, 36
    z = unit_rows(n, length, 10, np.random.default_rng()).astype(np.float64)
    d = np.linalg.norm(z[:, None, :, :] - z[None, :, :, :], axis=-1)  # [i, j, p]: same position only
    k_min, k_max = interval_bounds(n - 1)
    expect = np.empty((n, length))
    for i in range(n):
        others = np.sort(np.delete(d[i], i, axis=0), axis=0)
        expect[i] = others[k_min:k_max].mean(axis=0)
    zt = torch.from_numpy(z.astype(np.float32))
    np.testing.assert_allclose(score_pass(zt, window=0).numpy(), expect, rtol=0, atol=ATOL_FP32)
    np.testing.assert_allclose(mutual_scores_aligned_reference(z, 0), expect, rtol=0, atol=1e-12)


def test_cross_similarity_window_matches_rows():
    z = torch.from_numpy(unit_rows(5, 49, 8, np.random.default_rng()))
    for w in (1, 3):
        rows = nearest_similarity_rows(z, 1, 3, window=w)
        cross = cross_similarity_torch(z[1:3], z, window=w)
        cross[0, :, 1] = cross[1, :, 2] = float("-inf")
        torch.testing.assert_close(rows, cross, rtol=0, atol=0)


def test_config_field():
    assert MuScConfig().aligned_window is None
    assert MuScConfig(aligned_window=0).aligned_window == 0
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="aligned_window"):
            MuScConfig(aligned_window=bad)
    assert MuScConfig.from_dict({**MuScConfig(aligned_window=3).to_dict()}).aligned_window == 3


def test_pipeline_and_bank_with_window():
    layers = random_layers(6, 25, (8, 6), seed=11)
    res = score_features(layers, None, image_size=20, r_list=(1, 3), aligned_window=1)
    ref = np.mean([mutual_scores_aligned_reference(lnamd(t, r).numpy(), 1) for t in layers for r in (1, 3)],
                  axis=0)
    np.testing.assert_allclose(res.patch_scores.reshape(6, -1), ref, rtol=0, atol=ATOL_FP32)
    full = score_features(layers, None, image_size=20, r_list=(1, 3))
    assert np.all(res.patch_scores >= full.patch_scores - 1e-6)  # a smaller search space: larger distances
    assert np.abs(res.patch_scores - full.patch_scores).max() > 1e-3
    streamed = score_features(layers, None, image_size=20, r_list=(1, 3), aligned_window=1,
                              memory=MemoryPlan(stream_rows=2))
    np.testing.assert_allclose(streamed.patch_scores, res.patch_scores, rtol=0, atol=1e-6)
    bank = Bank.from_features([t[1:] for t in layers], config=fake_config(image_size=20, aligned_window=1))
    row = bank.score_features([t[:1] for t in layers])
    np.testing.assert_allclose(row.patch_scores[0], res.patch_scores[0], rtol=0, atol=1e-6)
    assert full_similarity(lnamd(layers[0], 1), window=9).isinf().sum().item() == 6 * 25  # self only
