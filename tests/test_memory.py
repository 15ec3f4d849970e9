"""Memory-bounded scoring: the plan follows the budget, streaming equals the full table, the block
schedule writes every entry once, and the memory probe reads real numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast import score_features
from musc_fast.memory import (
    MemoryPlan,
    available_bytes,
    estimate_peak_bytes,
    parse_bytes,
    plan_bank,
    plan_scoring,
    score_pass,
)
from musc_fast.ops import mutual_scores
from musc_fast.ops.msm import nearest_similarity_torch, pair_tasks
from musc_fast.ops.reference import mutual_scores_reference
from tests.helpers import unit_rows
from tests.production_support import random_layers

ATOL_FP32 = 1e-5
ATOL_BLOCKS = 1e-6


def test_parse_bytes():
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30)) and parse_bytes(4096) == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_available_bytes(monkeypatch):
    monkeypatch.delenv("MUSC_FAST_MEMORY_BUDGET", raising=False)
    free = available_bytes("cpu")
    assert 16 << 20 < free < 1 << 50  # a real probe, not a constant fallback of 0 or infinity
    monkeypatch.setenv("MUSC_FAST_MEMORY_BUDGET", "3G")
    assert available_bytes("cpu") == 3 << 30


def test_plan_follows_budget():
    n, length, c = 1000, 1369, 1024
    z, sim = n * length * c * 4, n * length * n * 4
    roomy = plan_scoring(n, length, c, n_r=3, budget=200 << 30)
    assert roomy.stream_rows is None and roomy.lnamd_all_r and roomy.is_default
    one_r = plan_scoring(n, length, c, n_r=3, budget=5 * z)
    assert one_r.stream_rows is None and not one_r.lnamd_all_r
    tight = plan_scoring(n, length, c, n_r=3, budget=z + sim // 4)
    assert tight.stream_rows is not None and 1 <= tight.stream_rows < n
    for plan, budget in ((roomy, 200 << 30), (one_r, 5 * z)):
        assert estimate_peak_bytes(n, length, c, n_layers=0, n_r=3, token_bytes=2, plan=plan) <= budget
    # paper config, tokens resident: the documented 44.8 GB (all r) and 33.6 GB (one r) peaks
    tokens = 4 * n * length * c * 2
    peak_all = estimate_peak_bytes(n, length, c, n_layers=4, n_r=3, token_bytes=2, plan=roomy)
    peak_one = estimate_peak_bytes(n, length, c, n_layers=4, n_r=3, token_bytes=2, plan=one_r)
    assert peak_all == tokens + 6 * z and peak_one == tokens + 4 * z
    assert 44e9 < peak_all < 46e9 and 33e9 < peak_one < 34.5e9


def test_pair_tasks_write_every_entry_once():
    for n, length, block in [(7, 9, 10 ** 6), (7, 9, 200), (5, 16, 16 * 16), (1, 4, 100), (11, 4, 50)]:
        count = np.zeros((n, n), dtype=int)
        for i0, i1, j0, j1 in pair_tasks(n, length, block):
            assert 0 <= i0 < i1 <= n and i0 <= j0 < j1 <= n
            count[i0:i1, j0:j1] += 1  # row maxima
            lo = max(j0, i1)
            count[lo:j1, i0:i1] += 1  # column maxima
        np.testing.assert_array_equal(count, np.ones((n, n), dtype=int))


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_streaming_equals_full_and_reference(rows):
    z = torch.from_numpy(unit_rows(8, 49, 24, np.random.default_rng()))
    full = mutual_scores(z)
    stream = score_pass(z, plan=MemoryPlan(stream_rows=rows, rows_per_chunk=5))
    np.testing.assert_allclose(stream.numpy(), full.numpy(), rtol=0, atol=ATOL_BLOCKS)
    np.testing.assert_allclose(stream.numpy(), mutual_scores_reference(z.numpy()), rtol=0, atol=ATOL_FP32)


def test_values_independent_of_non_numeric_knobs():
    """rows_per_chunk only groups top-k calls: bit-identical. block_elems changes the blocks only."""
    z = torch.from_numpy(unit_rows(9, 49, 16, np.random.default_rng()))
    default = score_pass(z)
    np.testing.assert_array_equal(score_pass(z, plan=MemoryPlan(rows_per_chunk=2)).numpy(), default.numpy())
    small_blocks = score_pass(z, plan=MemoryPlan(block_elems=49 * 49))
    np.testing.assert_allclose(small_blocks.numpy(), default.numpy(), rtol=0, atol=ATOL_BLOCKS)
    np.testing.assert_array_equal(nearest_similarity_torch(z, block_elems=2 * 49 * 49).isinf().sum(),
                                  torch.tensor(9 * 49))  # only the self entries are -inf


def test_score_features_under_a_small_budget(monkeypatch):
    layers = random_layers(16, 49, (8, 8), seed=7)
    base = score_features(layers, None, image_size=28, r_list=(1, 3, 5))
    monkeypatch.setenv("MUSC_FAST_MEMORY_BUDGET", "120K")  # half of it is planned: below 4 Z + the table
    plan = plan_scoring(16, 49, 8, n_r=3, device="cpu")
    assert plan.stream_rows is not None and not plan.lnamd_all_r  # the env budget forces streaming
    small = score_features(layers, None, image_size=28, r_list=(1, 3, 5))
    np.testing.assert_allclose(small.patch_scores, base.patch_scores, rtol=0, atol=ATOL_BLOCKS)
    np.testing.assert_allclose(small.anomaly_maps, base.anomaly_maps, rtol=0, atol=ATOL_BLOCKS)
    explicit = score_features(layers, None, image_size=28, r_list=(1, 3, 5),
                              memory=MemoryPlan(stream_rows=4, lnamd_all_r=False, map_chunk=3))
    np.testing.assert_allclose(explicit.patch_scores, base.patch_scores, rtol=0, atol=ATOL_BLOCKS)


def test_plan_bank_cache_and_chunks():
    roomy = plan_bank(1, 200, 1369, 1024, n_layers=4, n_r=3, budget=100 << 30)
    assert roomy.cache_z and roomy.query_block == 1 and roomy.bank_chunk == 200
    tight = plan_bank(64, 200, 1369, 1024, n_layers=4, n_r=3, budget=4 << 30)
    assert not tight.cache_z and tight.bank_chunk < 200 and tight.query_block < 64
