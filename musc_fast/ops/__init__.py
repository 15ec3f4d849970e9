"""Public algorithm steps, each dispatched to the fastest exact backend available.

``lnamd``, ``mutual_scores`` and ``rscin`` are the names other tools embed. Each hot op picks its
backend here (DESIGN 3): ``MUSC_FAST_<OP>=torch`` forces the torch path, ``=triton`` forces the Triton
kernel (also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses the kernel on CUDA
when Triton is importable and the torch path everywhere else; ``MUSC_FAST_MSM=faiss`` uses FAISS for the
nearest-neighbour step (see ``backend`` and ENV.md). Inputs may be numpy arrays or tensors;
numpy in gives numpy out.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .interval import SmallBatchWarning, interval_bounds
from .lnamd import lnamd_multi_torch, lnamd_torch
from .maps import maps_and_image_scores, upsample_maps
from .msm import interval_mean_from_similarity, mutual_scores_torch, nearest_similarity_torch
from .rscin import rscin

__all__ = [
    "lnamd", "lnamd_multi", "mutual_scores", "nearest_similarity", "rscin", "interval_bounds",
    "interval_mean_from_similarity", "upsample_maps", "maps_and_image_scores", "backend",
    "SmallBatchWarning",
]

# Allowed values of MUSC_FAST_<OP> per op; "faiss" is a provider for MSM's nearest-neighbour step only.
_BACKENDS = {"msm": ("auto", "torch", "triton", "faiss"), "lnamd": ("auto", "torch", "triton")}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend(op: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> str:
    """The backend ``op`` (``"msm"`` or ``"lnamd"``) will use for tensors on ``device``.

    ``MUSC_FAST_<OP>``: ``auto`` (default) = the Triton kernel for CUDA tensors of a kernel dtype
    (fp32/fp16/bf16) when Triton is importable, the torch path otherwise; ``torch`` = always torch;
    ``triton`` = always the kernel (CPU tensors need ``TRITON_INTERPRET=1``), an error if it cannot run;
    ``faiss`` (msm only) = FAISS exact search for the nearest-neighbour step, an error if faiss is missing.
    """
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_BACKENDS)}")
    env = f"MUSC_FAST_{op.upper()}"
    choice = os.environ.get(env, "auto").strip().lower()
    if choice not in _BACKENDS[op]:
        raise ValueError(f"{env}={choice!r} is not one of {', '.join(_BACKENDS[op])}")
    if choice == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto" and not (on_cuda and (dtype is None or dtype in _KERNEL_DTYPES)):
        return "torch"  # decided without importing triton
    from .. import kernels

    if choice == "faiss":
        ok, why = kernels.faiss_available()
        if not ok:
            raise RuntimeError(f"{env}=faiss but FAISS cannot run here: {why}")
        return "faiss"
    ok, why = kernels.available()
    if choice == "triton":
        if not ok:
            raise RuntimeError(f"{env}=triton but the Triton kernels cannot run here: {why}")
        if not on_cuda and not kernels._interpreting():
            raise RuntimeError(f"{env}=triton with tensors on {device}: compiled kernels need CUDA tensors "
                               "(set TRITON_INTERPRET=1 to run them on CPU with the Triton interpreter)")
        return "triton"
    return "triton" if ok else "torch"


def _to_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.from_numpy(np.ascontiguousarray(x)), True


def _back(x: torch.Tensor, was_numpy: bool):
    return x.cpu().numpy() if was_numpy else x


def lnamd(tokens, r: int):
    """LNAMD features of one layer (SPEC 2).

    Args:
        tokens: [N, L, C] patch tokens of one layer, CLS removed, L = G*G row-major.
        r: odd aggregation degree.
    Returns:
        Z [N, L, C] float32: LayerNorm over (C, G, G) per image, r x r zero-padded box mean,
        L2-normalised rows.
    """
    t, was_np = _to_tensor(tokens)
    if backend("lnamd", t.device, t.dtype) == "triton":
        from ..kernels import lnamd_triton

        return _back(lnamd_triton(t, [r])[0], was_np)
    return _back(lnamd_torch(t, r), was_np)


def lnamd_multi(tokens, r_list) -> list:
    """LNAMD for every r of ``r_list`` from one read of the tokens; one [N, L, C] float32 per r."""
    t, was_np = _to_tensor(tokens)
    if backend("lnamd", t.device, t.dtype) == "triton":
        from ..kernels import lnamd_triton

        return [_back(z, was_np) for z in lnamd_triton(t, list(r_list))]
    return [_back(z, was_np) for z in lnamd_multi_torch(t, r_list)]


def nearest_similarity(z, *, precision: str = "fp32"):
    """sim [N, L, N] float32: ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>``, -inf where j == i."""
    t, was_np = _to_tensor(z)
    return _back(_nearest_similarity(t, precision, backend("msm", t.device, t.dtype)), was_np)


def _nearest_similarity(t: torch.Tensor, precision: str, which: str) -> torch.Tensor:
    if which == "triton":
        from ..kernels import nearest_similarity_triton

        return nearest_similarity_triton(t, precision=precision)
    if which == "faiss":
        from ..kernels import nearest_similarity_faiss

        return nearest_similarity_faiss(t, precision=precision)
    return nearest_similarity_torch(t, precision=precision)


def mutual_scores(z, topmin: tuple[float, float] = (0.0, 0.3), *, compat: bool = False,
                  precision: str = "fp32"):
    """MSM patch scores of one (r, layer) pass (SPEC 3).

    Args:
        z: [N, L, C] unit rows (the output of ``lnamd``).
        topmin: which sorted per-image nearest distances to average; default the floor(0.3 (N-1))
            smallest. Values < 1 are fractions of N-1, values >= 1 counts (SPEC 3.2).
        compat: N <= 4 gives NaN like the original instead of averaging the single nearest image.
        precision: ``"fp32"`` exact, ``"bf16"``/``"fp16"`` tensor-core matmuls on GPU.
    Returns:
        [N, L] float64.
    """
    t, was_np = _to_tensor(z)
    which = backend("msm", t.device, t.dtype)
    if which == "torch":
        return _back(mutual_scores_torch(t, topmin, compat=compat, precision=precision), was_np)
    k_min, k_max = interval_bounds(t.shape[0] - 1, topmin, compat=compat)
    sim = _nearest_similarity(t, precision, which)
    if which == "triton":
        from ..kernels import interval_mean_triton

        return _back(interval_mean_triton(sim, k_min, k_max), was_np)
    return _back(interval_mean_from_similarity(sim, k_min, k_max), was_np)
