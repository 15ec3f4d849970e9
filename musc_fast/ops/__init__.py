"""Public algorithm steps, each dispatched to the fastest exact backend available.

``lnamd``, ``mutual_scores`` and ``rscin`` are the names other tools embed. Each hot op picks its
backend here (DESIGN 3): ``MUSC_FAST_<OP>=torch`` forces the torch path, ``=triton`` forces the Triton
kernel (also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses the kernel on CUDA
when Triton is importable and the torch path everywhere else. Inputs may be numpy arrays or tensors;
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

_BACKENDS = ("auto", "torch", "triton")


def backend(op: str, device: torch.device | str = "cpu") -> str:
    """The backend ``op`` (``"msm"`` or ``"lnamd"``) will use for tensors on ``device``."""
    env = f"MUSC_FAST_{op.upper()}"
    choice = os.environ.get(env, "auto").strip().lower()
    if choice not in _BACKENDS:
        raise ValueError(f"{env}={choice!r} is not one of {', '.join(_BACKENDS)}")
    if choice == "torch":
        return "torch"
    from .. import kernels

    ok, why = kernels.available()
    if choice == "triton":
        if not ok:
            raise RuntimeError(f"{env}=triton but the Triton kernels cannot run here: {why}")
        return "triton"
    return "triton" if ok and torch.device(device).type == "cuda" else "torch"


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
    if backend("lnamd", t.device) == "triton":
        from ..kernels import lnamd_triton

        return _back(lnamd_triton(t, [r])[0], was_np)
    return _back(lnamd_torch(t, r), was_np)


def lnamd_multi(tokens, r_list) -> list:
    """LNAMD for every r of ``r_list`` from one read of the tokens; one [N, L, C] float32 per r."""
    t, was_np = _to_tensor(tokens)
    if backend("lnamd", t.device) == "triton":
        from ..kernels import lnamd_triton

        return [_back(z, was_np) for z in lnamd_triton(t, list(r_list))]
    return [_back(z, was_np) for z in lnamd_multi_torch(t, r_list)]


def nearest_similarity(z, *, precision: str = "fp32"):
    """sim [N, L, N] float32: ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>``, -inf where j == i."""
    t, was_np = _to_tensor(z)
    if backend("msm", t.device) == "triton":
        from ..kernels import nearest_similarity_triton

        return _back(nearest_similarity_triton(t, precision=precision), was_np)
    return _back(nearest_similarity_torch(t, precision=precision), was_np)


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
    if backend("msm", t.device) == "triton":
        k_min, k_max = interval_bounds(t.shape[0] - 1, topmin, compat=compat)
        return _back(interval_mean_from_similarity(nearest_similarity(t, precision=precision),
                                                   k_min, k_max), was_np)
    return _back(mutual_scores_torch(t, topmin, compat=compat, precision=precision), was_np)
