"""Interval mean (the mean of the sorted distances in [k_min, k_max), self excluded): the Triton kernel
against the float64 reference and the torch top-k path, on exact ties and continuous values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast import kernels
from musc_fast.ops.msm import interval_mean_from_similarity
from tests.helpers import DEVICE, as_numpy, interval_mean_reference, on_device


def _tied_similarities(n: int, length: int, rng, levels: int = 4) -> np.ndarray:
    """[N, L, N] float32 with many exact ties (a few distinct values), -inf on the self entries."""
    sim = (rng.integers(0, levels, size=(n, length, n)) / levels * 1.5 - 0.4).astype(np.float32)
    sim[np.arange(n), :, np.arange(n)] = -np.inf
    return sim


@pytest.mark.triton
@pytest.mark.parametrize("n", [2, 3, 5, 7, 12])
def test_interval_mean_exact_ties(n, rng):
    sim = _tied_similarities(n, 25, rng)
    for k_min, k_max in {(0, 1), (0, max(1, (n - 1) // 3)), (0, n - 1), (min(1, n - 2), n - 1),
                         (n // 3, max(n // 3 + 1, 2 * (n - 1) // 3))}:
        if k_max <= k_min or k_max > n - 1:
            continue
        out = kernels.interval_mean_triton(on_device(sim), k_min, k_max)
        assert out.dtype == torch.float64 and out.shape == (n, 25)
        np.testing.assert_allclose(as_numpy(out), interval_mean_reference(sim, k_min, k_max), rtol=1e-13, atol=1e-14)


@pytest.mark.triton
def test_interval_mean_continuous_matches_torch_topk_path(rng):
    sim = rng.uniform(-0.2, 1.05, size=(9, 49, 9)).astype(np.float32)  # includes s > 1 (distance 0)
    sim[np.arange(9), :, np.arange(9)] = -np.inf
    for k_min, k_max in [(0, 2), (2, 6), (0, 8)]:
        out = as_numpy(kernels.interval_mean_triton(on_device(sim), k_min, k_max))
        np.testing.assert_allclose(out, interval_mean_from_similarity(torch.from_numpy(sim), k_min, k_max),
                                   rtol=1e-13, atol=1e-14)


@pytest.mark.triton
def test_interval_mean_sums_passes_and_accumulates(rng):
    sims = np.stack([_tied_similarities(6, 16, rng, levels=9) for _ in range(3)])
    one = [interval_mean_reference(s, 1, 3) for s in sims]
    out = kernels.interval_mean_triton(on_device(sims), 1, 3)
    np.testing.assert_allclose(as_numpy(out), sum(one), rtol=1e-13)
    again = kernels.interval_mean_triton(on_device(sims[0]), 1, 3, out=out, accumulate=True)
    assert again is out
    np.testing.assert_allclose(as_numpy(out), sum(one) + one[0], rtol=1e-13)
    out32 = torch.zeros((6, 16), dtype=torch.float32, device=DEVICE)
    kernels.interval_mean_triton(on_device(sims[1]), 1, 3, out=out32)
    np.testing.assert_allclose(as_numpy(out32), one[1], rtol=1e-6)


@pytest.mark.triton
def test_interval_mean_empty_interval_is_nan_and_bad_bounds_raise(rng):
    sim = on_device(_tied_similarities(4, 9, rng))
    assert torch.isnan(kernels.interval_mean_triton(sim, 0, 0)).all()
    with pytest.raises(ValueError, match="outside"):
        kernels.interval_mean_triton(sim, 0, 4)


@pytest.mark.triton
@pytest.mark.gpu
def test_gpu_interval_mean_large_n(rng):
    sim = torch.from_numpy(rng.uniform(-0.5, 1.0, size=(200, 64, 200)).astype(np.float32)).cuda()
    sim.diagonal(dim1=0, dim2=2).fill_(float("-inf"))
    out = kernels.interval_mean_triton(sim, 0, 59)
    torch.testing.assert_close(out, interval_mean_from_similarity(sim, 0, 59), rtol=1e-12, atol=1e-13)
