"""The engine's Triton provider in every mode (full, streaming, bank, 2-rank gloo shard, one-Gram) against
the float64 references, under the Triton interpreter on CPU at small shapes (compiled on a GPU). The
interpreter must be chosen before triton is first imported: as tests/test_kernels.py, this module sets
TRITON_INTERPRET=1 when it can, and otherwise reruns itself in a subprocess that can."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_TRUE = ("1", "true", "on", "yes")
_COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0").lower() not in _TRUE
if not _COMPILED and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
# a kernel that failed would fall back to torch with a KernelFallbackWarning: make that a failure here
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("error::musc_fast.ops.KernelFallbackWarning")]


def _ready() -> bool:
    if _COMPILED:
        return True
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(std.max, InterpretedFunction)


if _ready():
    import numpy as np

    from tests import engine_cases
    from tests.test_engine import compare_sharded, run_sharded

    @pytest.fixture()
    def triton_env(monkeypatch):
        monkeypatch.setenv("MUSC_FAST_MSM", "triton")
        monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
        if not _COMPILED:
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    @pytest.fixture()
    def rng():
        seed = int.from_bytes(os.urandom(4), "little")
        print(f"seed {seed}")
        return np.random.default_rng(seed)

    @pytest.mark.parametrize("shape", engine_cases.SHAPES[:2], ids=str)
    def test_full_and_streaming(triton_env, shape, rng):
        engine_cases.full_and_streaming("triton", *shape, rng)

    def test_duplicates(triton_env, rng):
        engine_cases.duplicates("triton", rng)

    def test_bank(triton_env, rng):
        engine_cases.bank("triton", rng)

    def test_chunked_cross(triton_env, rng):
        engine_cases.chunked_cross("triton", rng)

    def test_bank_object(triton_env):
        engine_cases.bank_object("triton")

    def test_aligned_window_goes_to_torch(triton_env, rng):
        engine_cases.aligned("triton", rng)

    def test_one_gram(triton_env, rng):
        engine_cases.one_gram("triton", rng)

    def test_two_gloo_ranks_match_one_process(triton_env, tmp_path):
        env = {"MUSC_FAST_MSM": "triton", "MUSC_FAST_BOXGRAM": "1"}
        if not _COMPILED:
            env["TRITON_INTERPRET"] = "1"
        # the same tiles on every rank, max-merged: bit for bit (the kernel's atomics are max, exact)
        compare_sharded(run_sharded(tmp_path, env), "triton", bitwise=True)
else:

    def test_engine_triton_in_interpreter_subprocess():
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(Path(__file__).relative_to(root))],
                             cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
