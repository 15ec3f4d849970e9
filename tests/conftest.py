"""Shared fixtures: where ../shared lives, the seeded random generator, and the rules for optional hardware
(``gpu``: needs CUDA; ``triton``: Triton kernels, compiled on a GPU or under the interpreter on CPU)."""
from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

# The Triton interpreter is chosen when triton itself is first imported (its tl.max, tl.sum are decorated
# then), and torch._dynamo (imported by torchvision, timm, open_clip) imports triton: so the choice is made
# here, before any test module is collected. Without CUDA the kernels run interpreted on CPU tensors; the
# ops' ``auto`` gate still picks torch for CPU tensors, so the other tests are unaffected.
_TRUE = ("1", "true", "on", "yes")
COMPILED_TRITON = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0").lower() not in _TRUE
if not COMPILED_TRITON and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

# One seed per session (MUSC_FAST_TEST_SEED=<int> replays a run); each test's generator is derived from it
# and the test's id, so a failing test replays alone with the same numbers.
SESSION_SEED = int(os.environ.get("MUSC_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI and this workplace); MUSC_FAST_SHARED overrides it.
SHARED = Path(os.environ.get("MUSC_FAST_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a clear reason when it is absent (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: the shared golden data and data sets live beside the checkout in CI")
    return p


def pytest_report_header(config):
    return f"musc_fast test seed: {SESSION_SEED} (replay with MUSC_FAST_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the session seed and the test id; the seed is printed (pytest shows it
    with a failure's captured output)."""
    import numpy as np

    seed = (SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0xFFFFFFFF
    print(f"rng seed {seed} (MUSC_FAST_TEST_SEED={SESSION_SEED} replays this run)")
    return np.random.default_rng(seed)


@pytest.fixture
def golden():
    """Load ``../shared/golden/<name>.npz`` by name."""
    import numpy as np

    def load(name: str):
        return np.load(shared_path("golden", f"{name}.npz"))

    return load


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_setup(item):
    """``triton`` tests skip only where triton is not installed; installed but unable to run is a failure
    (CI has triton: its kernel tests must run there, not quietly skip)."""
    if item.get_closest_marker("triton") is None:
        return
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from musc_fast import kernels

    ok, why = kernels.available()
    if not ok:
        pytest.fail(f"triton is installed but its kernels cannot run in this process: {why}")
