"""The scoring engine: every mode x provider (torch, faiss, triton) against the float64 references, the planner's
choices and reasons, ``Result.plan``, and a real 2-rank gloo shard bit for bit equal to one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musc_fast import engine, kernels, score_features
from musc_fast.memory import MemoryPlan
from tests import engine_cases
from tests.production_support import random_layers

REPO = Path(__file__).resolve().parents[1]
MARKS = {
    "torch": [],
    "faiss": [pytest.mark.skipif(not kernels.faiss_available()[0], reason="faiss is not installed")],
    # compiled on a GPU, else under the interpreter on CPU tensors (tests/conftest.py); a kernel that failed
    # would fall back to torch with a KernelFallbackWarning: that is a failure here.
    "triton": [pytest.mark.triton, pytest.mark.filterwarnings("error::musc_fast.ops.KernelFallbackWarning")],
}
PROVIDERS = [pytest.param(p, marks=m, id=p) for p, m in MARKS.items()]


@pytest.fixture(params=PROVIDERS)
def provider(request, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_MSM", request.param)
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
    monkeypatch.setenv("MUSC_FAST_NATIVE", "0")  # the fused CPU one-Gram kernel: test_one_gram_native
    return request.param


# the interpreter is slow: triton takes the first two shapes
@pytest.mark.parametrize("provider, shape", [
    pytest.param(p, s, marks=m, id=f"{p}-{s}") for p, m in MARKS.items()
    for s in (engine_cases.SHAPES[:2] if p == "triton" else engine_cases.SHAPES)], indirect=["provider"])
def test_full_and_streaming(provider, shape, rng):
    engine_cases.full_and_streaming(provider, *shape, rng)


def test_duplicates(provider, rng):
    engine_cases.duplicates(provider, rng)


def test_bank(provider, rng):
    engine_cases.bank(provider, rng)


def test_chunked_cross(provider, rng):
    engine_cases.chunked_cross(provider, rng)


def test_bank_object(provider):
    engine_cases.bank_object(provider)


def test_aligned_window(provider, rng):
    engine_cases.aligned(provider, rng)  # the window is torch's; triton and faiss hand it over


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p.id != "faiss"], indirect=True)
def test_one_gram(provider, rng):
    engine_cases.one_gram(provider, rng)


def test_one_gram_native(monkeypatch, rng):
    from musc_fast.kernels import boxgram_cpu

    if not boxgram_cpu.available()[0]:
        pytest.skip("no C compiler builds the native kernel")
    for key, value in (("MUSC_FAST_MSM", "torch"), ("MUSC_FAST_BOXGRAM", "1"), ("MUSC_FAST_NATIVE", "1")):
        monkeypatch.setenv(key, value)
    engine_cases.one_gram("native", rng)


def test_faiss_has_no_one_gram(monkeypatch):
    if not kernels.faiss_available()[0]:
        pytest.skip("faiss is not installed")
    monkeypatch.setenv("MUSC_FAST_MSM", "faiss")
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
    ok, why = engine.use_onegram(5, 16, 12, (1, 3), device="cpu", window=None, memory=MemoryPlan())
    assert not ok and "faiss" in why


# ---- the planner -------------------------------------------------------------------------------------


def test_cuda_kernels_run_in_every_mode_but_the_window(monkeypatch):
    """On CUDA (kernels available, a measured precision) the Triton provider is planned for the full
    table, streaming rows, the bank and sharded passes alike: no memory plan turns it off silently."""
    monkeypatch.delenv("MUSC_FAST_MSM", raising=False)
    monkeypatch.setattr(kernels, "available", lambda: (True, "fake CUDA"))
    kw = dict(n=50, length=1369, device="cuda", dtype=torch.float32, precision="bf16")
    for memory in (MemoryPlan(), MemoryPlan(block_elems=1 << 20, rows_per_chunk=8),
                   MemoryPlan(stream_rows=7, lnamd_all_r=False)):
        pp = engine.plan_pass("msm", memory=memory, **kw)
        assert (pp.provider, pp.interval) == ("triton", "triton"), pp.describe()
    monkeypatch.setattr("musc_fast.distributed.world_size", lambda: 4)
    assert engine.plan_pass("msm", **kw).ranks == 4 and engine.plan_pass("msm", **kw).provider == "triton"
    windowed = engine.plan_pass("msm", window=2, **kw)
    assert windowed.provider == "torch" and "aligned-window" in windowed.reason
    exact = engine.plan_pass("msm", **{**kw, "precision": "fp32"})  # the exact kernel path is untimed on GPU
    assert exact.provider == "torch" and "no GPU timing" in exact.reason


def test_cpu_plans_torch_and_says_why(monkeypatch):
    monkeypatch.delenv("MUSC_FAST_MSM", raising=False)
    pp = engine.plan_pass("msm", n=5, length=16, device="cpu")
    assert (pp.provider, pp.mode, pp.schedule) == ("torch", "full", "pairs") and pp.reason == "auto: CPU tensors"
    assert engine.plan_pass("msm", n=5, length=25, device="cpu", window=0).schedule == "rows"  # shift path
    monkeypatch.setenv("MUSC_FAST_MSM", "bogus")
    with pytest.raises(ValueError, match="MUSC_FAST_MSM"):
        engine.plan_pass("msm", n=5, length=16, device="cpu")


def test_result_names_the_plan_of_every_pass(monkeypatch):
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "0")
    layers = random_layers(6, 16, (12, 10), seed=3)
    res = score_features(layers, None, image_size=16, r_list=(1, 3), memory=MemoryPlan(stream_rows=4))
    assert [(p["layer"], p["r"]) for p in res.plan] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    assert all(p["mode"] == "streaming" and p["provider"] == "torch" and p["rows"] == 4 for p in res.plan)
    assert engine.summarize(res.plan) == [f"4 x {engine.PassPlan.from_dict(res.plan[0]).describe()}"]
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
    res = score_features(layers, None, image_size=16, r_list=(1, 3))
    assert [(p["op"], p["layer"], tuple(p["r_list"])) for p in res.plan] == [("onegram", 0, (1, 3)),
                                                                              ("onegram", 1, (1, 3))]


# ---- sharded over two gloo ranks -----------------------------------------------------------------------


def run_sharded(tmp_path: Path, env_extra: dict) -> dict:
    """tests/engine_dist_support.py under torchrun (2 gloo ranks) -> its npz."""
    out = tmp_path / "engine_dist.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env_extra}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "engine_dist_support.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def compare_sharded(got: dict, provider: str, bitwise: bool) -> None:
    from tests.engine_dist_support import cases, inputs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = cases()
    finally:
        torch.set_num_threads(threads)
    assert set(got["ranks"].tolist()) == {2} and set(ref["ranks"].tolist()) == {1}
    np.testing.assert_array_equal(got["providers"], ref["providers"])
    assert provider in got["providers"].tolist()
    z, _ = inputs()
    want = engine_cases._quiet(engine_cases.mutual_scores_reference, z.numpy())
    for name in ("full", "small_blocks", "streaming", "window_shift", "onegram"):
        if bitwise:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=engine_cases.ATOL_FP32, err_msg=name)
        if name in ("full", "small_blocks", "streaming"):
            np.testing.assert_allclose(got[name], want, rtol=0, atol=engine_cases.ATOL_FP32, err_msg=name)


@pytest.mark.parametrize("which", PROVIDERS)
def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch, which):
    env = {"MUSC_FAST_MSM": which, "MUSC_FAST_BOXGRAM": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # torch and triton: the same blocks on every rank, merged exactly (the kernel's atomics are max) -> bit
    # for bit. faiss: one process searches every query of an image at once, a shard only its blocks'
    # (another BLAS blocking) -> fp32 tolerance. TRITON_INTERPRET (conftest) reaches the ranks via os.environ.
    compare_sharded(run_sharded(tmp_path, env), which, bitwise=which != "faiss")


# ---- measured dispatch wired into the planner --------------------------------------------------------


def test_measured_dispatch_picks_a_correct_provider_and_caches_it(tmp_path, monkeypatch, rng):
    """With measuring on, the planner times the qualifying providers (torch and faiss on this CPU) on a
    slice of the pass, never picks a wrong one, and the second pass reads the decision from the cache."""
    if not kernels.faiss_available()[0]:
        pytest.skip("faiss is not installed")
    from musc_fast.engine import nn_faiss

    monkeypatch.delenv("MUSC_FAST_MSM", raising=False)
    monkeypatch.setenv("MUSC_FAST_DISPATCH", "measure")
    monkeypatch.setenv("MUSC_FAST_CACHE", str(tmp_path / "cache"))
    wrong = lambda z, tasks, **kw: torch.zeros((z.shape[0], z.shape[1], z.shape[0]))  # fast and wrong
    monkeypatch.setattr(nn_faiss, "pairs_table", wrong)
    z = torch.from_numpy(engine_cases.unit_rows(6, 16, 12, rng))
    plans: list = []
    out = engine.score_pass(z, plans=plans)
    assert plans[0].provider == "torch" and plans[0].reason.startswith("measured:"), plans[0].reason
    np.testing.assert_allclose(out.numpy(), engine_cases.mutual_scores_reference(z.numpy()), rtol=0,
                               atol=engine_cases.ATOL_FP32)
    engine.score_pass(z, plans=plans)
    assert plans[1].provider == "torch" and plans[1].reason.startswith("measured (cached)"), plans[1].reason
    monkeypatch.setenv("MUSC_FAST_DISPATCH", "static")  # measuring off: the static rule, no cache
    engine.score_pass(z, plans=plans)
    assert plans[2].reason == "auto: CPU tensors"
