"""A failing Triton kernel never crashes a run: the first-use probe (ops.kernel_ok) or a failing call turns
the kernel off with one KernelFallbackWarning, and the torch path answers. The kernels are monkeypatched
(raise, or return wrong numbers) and the probe is enabled for CPU tensors, so no GPU or triton is needed."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from musc_fast import kernels, ops
from musc_fast.ops import KernelFallbackWarning, backend
from musc_fast.ops.boxgram import mutual_scores_multi, nearest_similarity_multi_torch
from musc_fast.ops.lnamd import layer_norm_chw, lnamd_multi_torch
from musc_fast.ops.msm import interval_mean_from_similarity, mutual_scores_torch, nearest_similarity_torch
from tests.helpers import COMPILED, DEVICE, unit_rows


@pytest.fixture()
def probed(monkeypatch):
    """Kernels forced on, probes on for CPU tensors, a fresh per-process kernel state; the kernels are
    torch stand-ins (correct) unless a test replaces them. Returns a dict of call counts."""
    calls = {"mm": 0, "im": 0, "ln": 0, "bg": 0}
    monkeypatch.setattr(ops, "PROBE_DEVICES", ["cuda", "cpu"])
    monkeypatch.setattr(ops, "_KERNEL_STATE", {})
    monkeypatch.setattr(ops, "backend", lambda *a, **k: "triton")

    def mm(z, precision="fp32"):
        calls["mm"] += 1
        return nearest_similarity_torch(z)

    def im(sim, k_min, k_max, **kw):
        calls["im"] += 1
        return interval_mean_from_similarity(sim, k_min, k_max)

    def ln(t, r_list, **kw):
        calls["ln"] += 1
        return lnamd_multi_torch(t, r_list)

    def bg(x, r_list, precision="fp32", **kw):
        calls["bg"] += 1
        return nearest_similarity_multi_torch(x, r_list)

    monkeypatch.setattr(kernels, "nearest_similarity_triton", mm)
    monkeypatch.setattr(kernels, "interval_mean_triton", im)
    monkeypatch.setattr(kernels, "lnamd_triton", ln)
    monkeypatch.setattr(kernels, "nearest_similarity_multi_triton", bg)
    return calls


def _fallbacks(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]


def test_working_kernels_pass_the_probe_silently(probed):
    z = torch.from_numpy(unit_rows(6, 25, 20, np.random.default_rng()))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = ops.mutual_scores(z)
    assert _fallbacks(rec) == []
    assert probed["mm"] == 2 and probed["im"] == 2  # probe + the real call each
    torch.testing.assert_close(out, mutual_scores_torch(z), rtol=0, atol=0)


def test_compile_error_falls_back_with_one_warning(probed, monkeypatch):
    attempts = []

    def broken(z, precision="fp32"):
        attempts.append(1)
        raise RuntimeError("CompilationError: boom at mutual_min.py:42")

    monkeypatch.setattr(kernels, "nearest_similarity_triton", broken)
    z = torch.from_numpy(unit_rows(6, 25, 20, np.random.default_rng()))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = ops.mutual_scores(z)
        second = ops.mutual_scores(z)
    msgs = _fallbacks(rec)
    assert len(msgs) == 1 and "mutual_min/fp32" in msgs[0] and "boom" in msgs[0], msgs
    assert len(attempts) == 1  # off for good after the probe
    ref = mutual_scores_torch(z)
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(second, ref, rtol=0, atol=0)


def test_wrong_numbers_fall_back_per_kernel(probed, monkeypatch):
    monkeypatch.setattr(kernels, "nearest_similarity_triton",
                        lambda z, precision="fp32": nearest_similarity_torch(z) + 0.1)
    monkeypatch.setattr(kernels, "lnamd_triton",
                        lambda t, r_list, **kw: [z * 1.01 for z in lnamd_multi_torch(t, r_list)])
    rng = np.random.default_rng()
    z = torch.from_numpy(unit_rows(6, 25, 20, rng))
    tokens = torch.from_numpy(rng.standard_normal((3, 25, 16)).astype(np.float32))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = ops.mutual_scores(z, precision="bf16")
        feats = ops.lnamd_multi(tokens, [1, 3])
    msgs = _fallbacks(rec)
    assert len(msgs) == 2 and any("mutual_min/bf16" in m and "max |kernel - torch|" in m for m in msgs), msgs
    assert any(m.startswith("Triton kernel lnamd ") for m in msgs), msgs
    torch.testing.assert_close(out, mutual_scores_torch(z, precision="bf16"), rtol=0, atol=0)
    for a, b in zip(feats, lnamd_multi_torch(tokens, [1, 3])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert probed["im"] == 2  # the interval-mean kernel passed its own probe and kept running


def test_failure_after_the_probe_falls_back(probed, monkeypatch):
    """A specialisation the probe did not build fails on the real call: torch answers it, one warning."""
    def big_fails(x, r_list, precision="fp32", **kw):
        if x.shape[0] > 3:  # the probe uses 3 images
            raise RuntimeError("out of resources: shared memory")
        return nearest_similarity_multi_torch(x, r_list)

    monkeypatch.setattr(kernels, "nearest_similarity_multi_triton", big_fails)
    rng = np.random.default_rng()
    x = layer_norm_chw(torch.from_numpy((rng.standard_normal((6, 49, 24)) + 1).astype(np.float32)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = mutual_scores_multi(x, (1, 3))
    msgs = _fallbacks(rec)
    assert len(msgs) == 1 and "boxgram/fp32" in msgs[0] and "shared memory" in msgs[0], msgs
    ref = torch.stack([interval_mean_from_similarity(s, 0, 1)
                       for s in nearest_similarity_multi_torch(x, (1, 3))])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_input_errors_are_not_swallowed(probed, monkeypatch):
    def bad(t, r_list, **kw):
        if 2 in r_list:
            raise ValueError("aggregation degrees must be odd and positive")
        return lnamd_multi_torch(t, r_list)

    monkeypatch.setattr(kernels, "lnamd_triton", bad)
    with pytest.raises(ValueError, match="odd"):
        ops.lnamd_multi(torch.ones(2, 9, 4), [2])


def test_auto_sends_unmeasured_exact_modes_to_torch(monkeypatch):
    monkeypatch.delenv("MUSC_FAST_MSM", raising=False)
    for precision in ("fp32", "fp32-ieee"):
        assert backend("msm", "cuda", torch.float32, precision) == "torch"
    monkeypatch.setenv("MUSC_FAST_MSM", "torch")
    assert backend("msm", "cuda", torch.float32, "bf16") == "torch"


# --- the gate's values and its import discipline -----------------------------------------------------


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


@pytest.mark.triton
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
