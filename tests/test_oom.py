"""Out of memory while scoring: the plan shrinks (memory.MemoryPlan.degraded) and the failed step is
repeated; results stay identical. The allocation failure is simulated: product blocks larger than a limit
raise torch.OutOfMemoryError, as CUDA's allocator would."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from musc_fast import score_features
from musc_fast.memory import MemoryPlan, MemoryWarning, OomRetry
from musc_fast.ops import boxgram, msm
from tests.production_support import random_layers
from tests.reliability_support import TINY, out_root, read_json, run_cli, synthetic_copy

L = 64  # an 8 x 8 grid
LIMIT = 8 * L * L  # elements: a block of more than 8 image pairs "does not fit"


@pytest.fixture(scope="module")
def layers():
    return random_layers(9, L, (16, 12), seed=5)


@pytest.fixture(scope="module")
def cls():
    return torch.randn(9, 6, generator=torch.Generator().manual_seed(1))


def _score(layers, cls, plan=None):
    return score_features(layers, cls, image_size=32, r_list=(1, 3, 5), memory=plan or MemoryPlan())


class SmallGpu:
    """``on()``: product blocks over LIMIT elements raise torch.OutOfMemoryError (both MSM paths);
    ``failed`` lists the sizes of the blocks that failed."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.failed = monkeypatch, []

    def _check(self, elems: int) -> None:
        if elems > LIMIT:
            self.failed.append(elems)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {4 * elems} bytes (simulated)")

    def on(self) -> "SmallGpu":
        real_gram, real_pair = boxgram.fill_boxgram_block, msm.fill_pair_block

        def gram(feats, by_patch, inv_norms, sim, task, g, r_list, work=None):
            _, j0, j1 = task
            self._check(4 * (j1 - j0) * L * L)  # the Gram block and its per-r temporaries
            return real_gram(feats, by_patch, inv_norms, sim, task, g, r_list, work)

        def pair(flat, sim, task, length, bias=None, work=None):
            i0, i1, j0, j1 = task
            self._check((i1 - i0) * (j1 - j0) * length * length)
            return real_pair(flat, sim, task, length, bias, work)

        self.monkeypatch.setattr(boxgram, "fill_boxgram_block", gram)
        self.monkeypatch.setattr(msm, "fill_pair_block", pair)
        return self


@pytest.fixture(autouse=True)
def torch_provider(monkeypatch):
    # The simulated allocator failure hooks the torch providers, which are what CUDA runs; the fused
    # native one-Gram provider is CPU-only (it never sees CUDA's allocator), so it is switched off here.
    monkeypatch.setenv("MUSC_FAST_NATIVE", "0")


@pytest.fixture
def small_gpu(monkeypatch):
    return SmallGpu(monkeypatch)


def _same(a, b):
    for field in ("patch_scores", "anomaly_maps", "raw_image_scores", "image_scores"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("one_gram", ["1", "0"])
def test_simulated_oom_is_survived_with_identical_results(layers, cls, monkeypatch, small_gpu, one_gram):
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", one_gram)
    ref = _score(layers, cls)
    small_gpu.on()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _score(layers, cls)
    assert small_gpu.failed, "the simulated allocation failure never fired"
    notes = [str(w.message) for w in caught if issubclass(w.category, MemoryWarning)]
    assert len(notes) == len(small_gpu.failed)  # one retry per failure, each logged
    assert all(n.startswith("out of memory while scoring (CUDA out of memory. Tried to allocate") and
               "retrying with full table, block" in n for n in notes)
    _same(got, ref)


def test_oom_that_stays_moves_the_one_gram_path_to_per_r_passes(layers, cls, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")  # the one-Gram path, whatever the default for this C

    def always(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    layers, cls = [t[:6] for t in layers], cls[:6]  # the leanest plan is slow: few images
    monkeypatch.setattr(boxgram, "fill_boxgram_block", always)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _score(layers, cls)
    assert any("LNAMD one r" in str(w.message) for w in caught)  # the path was left, as logged
    monkeypatch.undo()
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "0")
    _same(got, _score(layers, cls))  # exactly the per-r passes


def test_oom_everywhere_gives_up_after_the_ladder(layers, cls, monkeypatch):
    calls = []

    def always(*a, **k):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr("musc_fast.engine.run_onegram", always)
    monkeypatch.setattr("musc_fast.engine.run_msm", always)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(torch.OutOfMemoryError):
        warnings.simplefilter("always")
        _score(layers, cls)
    steps = sum(issubclass(w.category, MemoryWarning) for w in caught)
    assert len(calls) == steps + 1 and 3 <= steps < 40  # every plan tried once, then the error


def test_degraded_ladder_shrinks_and_ends():
    plan, seen = MemoryPlan(), []
    while plan is not None:
        seen.append(plan)
        plan = plan.degraded(n=10, length=L)
    assert len(seen) == len(set(seen)) and seen[-1].block_elems == L * L
    last = seen[-1]
    assert (last.lnamd_all_r, last.stream_rows, last.lnamd_chunk, last.rows_per_chunk) == (False, 1, 1, 1)
    blocks = [p.block_elems for p in seen]
    assert blocks == sorted(blocks, reverse=True)


def test_no_retry_under_several_ranks(monkeypatch):
    monkeypatch.setattr("musc_fast.distributed.world_size", lambda: 2)
    retry = OomRetry(MemoryPlan(), n=4, length=L)

    def oom(plan):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        retry.call(oom)
    assert retry.retries == 0  # ranks must agree on the blocks: no rank may change its plan alone


def test_cli_run_survives_oom_and_logs_it(tmp_path, capsys, small_gpu):
    data = synthetic_copy(tmp_path / "data", tmp_path / "base")
    args = ["run", "--dataset", "synthetic", "--data-path", data, *TINY]  # tiny_test at 64 px: L = 64
    assert run_cli(capsys, *args, "--out", tmp_path / "ref")[0] == 0
    small_gpu.on()
    code, out, _ = run_cli(capsys, *args, "--out", tmp_path / "oom")
    assert code == 0 and small_gpu.failed and "[texture] warning: out of memory while scoring" in out
    entry = read_json(out_root(tmp_path / "oom") / "texture" / "result.json")
    assert any("retrying with" in w for w in entry["warnings"])
    ra, rb = out_root(tmp_path / "oom"), out_root(tmp_path / "ref")
    assert (ra / "results.csv").read_bytes() == (rb / "results.csv").read_bytes()
    assert (ra / "texture" / "scores.csv").read_bytes() == (rb / "texture" / "scores.csv").read_bytes()
