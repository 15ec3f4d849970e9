"""The second primitive: per patch, the mean of the nearest distances sorted[k_min:k_max] of a table
(SPEC 3.2). Providers: ``torch`` (top-k in row chunks, ``ops.msm.interval_mean_from_similarity``) and
``triton`` (``kernels/interval_mean.py``, guarded by ``ops.run_kernel``)."""
from __future__ import annotations

import torch

from .. import kernels
from ..ops import run_kernel
from ..ops.msm import interval_mean_from_similarity

PROVIDERS = ("torch", "triton")


def interval_mean(sim: torch.Tensor, k_min: int, k_max: int, *, provider: str, rows_per_chunk: int,
                  n_others: int | None = None) -> torch.Tensor:
    """sim [B, L, M] float32 (-inf on self entries) -> [B, L] float64.

    ``n_others``: finite candidates per row (default M - 1, a square table with its diagonal); M for a
    table of new images against a bank."""
    torch_call = lambda: interval_mean_from_similarity(sim, k_min, k_max, rows_per_chunk=rows_per_chunk)
    if provider != "triton":
        return torch_call()
    square = sim.shape[0] == sim.shape[2] and n_others in (None, sim.shape[2] - 1)
    others = None if square else (sim.shape[2] - 1 if n_others is None else n_others)
    return run_kernel(("interval_mean",), sim.device,
                      lambda: kernels.interval_mean_triton(sim, k_min, k_max, n_others=others), torch_call)
