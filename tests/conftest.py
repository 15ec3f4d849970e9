"""Shared fixtures: where ../shared lives, and skip rules for optional hardware."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI and this workplace); MUSC_FAST_SHARED overrides it.
SHARED = Path(os.environ.get("MUSC_FAST_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a clear reason when it is absent (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: the shared golden data and data sets live beside the checkout in CI")
    return p


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
