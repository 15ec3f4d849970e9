"""Random inputs shared by the op tests (fresh draws each run unless a seed is given), and where the kernel
tests run (``DEVICE``) with their tolerances."""
from __future__ import annotations

import numpy as np
import torch

from tests.conftest import COMPILED_TRITON


def unit_rows(n: int, length: int, c: int, rng: np.random.Generator, *,
              structured: bool = True) -> np.ndarray:
    """[N, L, C] float32 unit rows. ``structured`` makes patches of the same grid position similar across
    images (like aligned objects), so nearest neighbours are meaningful and not all near-orthogonal."""
    if structured:
        proto = rng.standard_normal((1, length, c))
        z = proto + 0.6 * rng.standard_normal((n, length, c))
    else:
        z = rng.standard_normal((n, length, c))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return z.astype(np.float32)


def with_duplicates(z: np.ndarray) -> np.ndarray:
    """Copy image 0 into the last image and make every patch of image 1 the same vector (exact ties)."""
    z = z.copy()
    z[-1] = z[0]
    if len(z) > 2:
        z[1] = z[1, :1]
    return z


# --- where the kernel tests run, and their tolerances -------------------------------------------------
# tests/conftest.py chose the Triton mode before triton was imported: compiled on a GPU (CUDA and no
# TRITON_INTERPRET), else the interpreter on CPU tensors.
COMPILED = COMPILED_TRITON
DEVICE = "cuda" if COMPILED else "cpu"

ATOL_SIM_FP32 = 1e-6  # fp32 similarities: kernel vs torch's fp32 matmul (both ~1e-7 from fp64)
# ... at C=1024 the two summation orders differ more: 3.6e-7 measured between torch's fp32 matmul and a
# 32-wide blocked fp32 sum on CPU (1369 x 1369 maxima); 2e-6 leaves room for more rows.
ATOL_SIM_FP32_C1024 = 2e-6
ATOL_FP32 = 1e-5  # fp32 scores/distances vs the fp64 reference (the bar; golden README 1.1e-6)
ATOL_TIES = 1e-3  # identical vectors: sqrt(2 - 2s) turns s's 1e-7 rounding into ~5e-4 (golden quirk 2)
ATOL_LNAMD = 1e-6  # fp32 LNAMD vs fp64 reference and vs the torch path (golden README: 1.8e-7)
# bf16/fp16 outputs of LNAMD: one rounding of a unit-row value (half an ulp at 1: 2**-9 / 2**-12).
ATOL_LNAMD_OUT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# bf16 MSM: DESIGN rule, the kernel's error vs fp64 is at most 2x torch's own bf16 error on the same data.
BF16_RATIO = 2.0


def on_device(x: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor on the kernel tests' device."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE)


def as_numpy(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def public_input(x: np.ndarray):
    """Input for the public ops: numpy under the interpreter (numpy in, numpy out is part of the API);
    a CUDA tensor when compiled (a forced kernel backend refuses CPU tensors there)."""
    return x if DEVICE == "cpu" else on_device(x)


def off_diagonal(n: int, length: int) -> np.ndarray:
    """[N, L, N] bool: True off the self entries (j != i)."""
    return ~np.eye(n, dtype=bool)[:, None, :].repeat(length, axis=1)


def distances_of(sim) -> np.ndarray:
    """Similarities of unit rows -> float64 distances sqrt(2 - 2s)."""
    return np.sqrt(np.clip(2.0 - 2.0 * as_numpy(sim).astype(np.float64), 0.0, None))


def interval_mean_reference(sim: np.ndarray, k_min: int, k_max: int) -> np.ndarray:
    """Sort the N-1 distances of each patch (self excluded) and average sorted[k_min:k_max], float64."""
    n, length, _ = sim.shape
    d = distances_of(sim)
    out = np.empty((n, length))
    for i in range(n):
        for p in range(length):
            out[i, p] = np.sort(np.delete(d[i, p], i))[k_min:k_max].mean()
    return out
