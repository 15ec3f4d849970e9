"""Memory-bounded scoring: the plan follows the budget, streaming equals the full table, the block
schedule writes every entry once, and the memory probe reads real numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast import score_features
from musc_fast.engine import score_pass
from musc_fast.memory import (
    MemoryPlan,
    MemoryWarning,
    available_bytes,
    estimate_peak_bytes,
    lnamd_planned,
    parse_bytes,
    plan_bank,
    plan_scoring,
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
    n, length, c = 1000, 1369, 1024  # the paper shape at N = 1000
    z = n * length * c * 4
    plans = {
        "all_r": plan_scoring(n, length, c, n_r=3, budget=200 << 30),
        "one_r": plan_scoring(n, length, c, n_r=3, budget=5 * z),
        "chunked": plan_scoring(n, length, c, n_r=3, budget=14 * 10 ** 9),
        "stream": plan_scoring(n, length, c, n_r=3, budget=9 * 10 ** 9),
    }
    assert plans["all_r"].is_default and plans["all_r"].lnamd_all_r
    assert not plans["one_r"].lnamd_all_r and plans["one_r"].lnamd_chunk is None
    assert plans["chunked"].lnamd_chunk is not None and plans["chunked"].stream_rows is None
    assert plans["stream"].lnamd_chunk is not None and 1 <= plans["stream"].stream_rows < n
    for name, budget in (("all_r", 200 << 30), ("one_r", 5 * z), ("chunked", 14 * 10 ** 9),
                         ("stream", 9 * 10 ** 9)):
        work = estimate_peak_bytes(n, length, c, n_layers=0, n_r=3, token_bytes=2, plan=plans[name])
        assert work <= budget, name
    with pytest.warns(MemoryWarning, match="below the floor"):
        plan_scoring(n, length, c, n_r=3, budget=z)
    # the documented peaks of the paper config with fp16 tokens resident
    peak = {name: estimate_peak_bytes(n, length, c, n_layers=4, n_r=3, token_bytes=2, plan=p) / 1e9
            for name, p in [("all_r", plans["all_r"]), ("one_r", plans["one_r"]),
                            ("k64", MemoryPlan(lnamd_all_r=False, lnamd_chunk=64)),
                            ("k64_b100", MemoryPlan(lnamd_all_r=False, lnamd_chunk=64, stream_rows=100))]}
    assert [round(v, 1) for v in peak.values()] == [44.9, 33.6, 23.2, 18.3]


def test_lnamd_chunks_give_the_same_z():
    tokens = random_layers(7, 49, (16,), seed=2)[0]
    whole = lnamd_planned(tokens, [1, 3, 5], MemoryPlan())
    chunked = lnamd_planned(tokens, [1, 3, 5], MemoryPlan(lnamd_chunk=3))
    for a, b in zip(whole, chunked):  # per-image math; batched reductions may round 1 ulp apart
        torch.testing.assert_close(a, b, rtol=0, atol=2.5e-7)
    assert not torch.equal(whole[1], torch.zeros_like(whole[1]))


def test_pair_tasks_write_every_entry_once():
    for n, length, block in [(7, 9, 10 ** 6), (7, 9, 200), (5, 16, 16 * 16), (1, 4, 100), (11, 4, 50)]:
        count = np.zeros((n, n), dtype=int)
        for i0, i1, j0, j1 in pair_tasks(n, length, block):
            assert 0 <= i0 < i1 <= j0 < j1 <= n
            count[i0:i1, j0:j1] += 1  # row maxima
            count[j0:j1, i0:i1] += 1  # column maxima
        # every ordered pair of distinct images exactly once, no image against itself
        np.testing.assert_array_equal(count, 1 - np.eye(n, dtype=int))


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
    with pytest.warns(MemoryWarning, match="below the floor"):
        plan = plan_scoring(16, 49, 8, n_r=3, device="cpu")
    assert plan.stream_rows is not None and not plan.lnamd_all_r  # the env budget forces streaming
    with pytest.warns(MemoryWarning):
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
