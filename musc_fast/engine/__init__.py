"""The scoring engine: one primitive, several providers, every mode a task list plus a merge.

* ``tasks``: task lists (blocks of image pairs) of every mode, and which rank owns which task.
* ``nn_torch`` / ``nn_triton`` / ``nn_faiss``: providers of the primitive "a block of image pairs ->
  row maxima (and column maxima when symmetric) into a nearest-similarity table, optionally with the
  aligned-window mask" (``pairs_table`` symmetric, ``cross_table`` one direction).
* ``onegram``: the same primitive with an r axis (every r from one Gram block).
* ``interval``: the second primitive, the interval mean of a table (torch / triton).
* ``plan``: the planner (``plan_pass`` -> ``PassPlan``): mode, schedule, provider, precision, chunking.
* ``passes``: runs a plan (tasks -> provider -> merge over ranks -> interval mean).

``score_pass`` is the one-call form for a single (r, layer) pass.

To add a nearest-similarity provider: a module ``nn_<name>.py`` with ``NAME``, ``why_not(schedule,
window, device, precision)`` (None when it can run the pass, else a short reason the plan prints),
``pairs_table(z, tasks, ...)`` and ``cross_table(za, zb, ..., self_offset=None)``; list it in
``plan.NN_PROVIDERS`` and accept its name in ``ops._BACKENDS`` (``MUSC_FAST_MSM``); test it through
tests/engine_cases.py (every mode against the float64 references).
"""
from __future__ import annotations

import torch

from ..memory import MemoryPlan
from ..ops.interval import interval_bounds
from .interval import interval_mean
from .passes import cross_table, nearest_table, run_msm, run_onegram
from .plan import NN_PROVIDERS, PassPlan, candidates, choose_provider, plan_pass, summarize, use_onegram

__all__ = [
    "PassPlan", "plan_pass", "choose_provider", "candidates", "use_onegram", "summarize", "NN_PROVIDERS",
    "run_msm", "run_onegram", "nearest_table", "cross_table", "interval_mean", "score_pass", "full_similarity",
]


def score_pass(z: torch.Tensor, topmin: tuple[float, float] = (0.0, 0.3), *, compat: bool = False,
               precision: str = "fp32", plan: MemoryPlan | None = None, window: int | None = None,
               plans: list | None = None) -> torch.Tensor:
    """One (r, layer) MSM pass under a memory plan, planned and run by the engine (sharded when
    torch.distributed runs several ranks).

    Args:
        z: [N, L, C] unit rows. plan: chunk sizes (default: library defaults, full table).
        window: aligned-parts window, None = full search. plans: a list the ``PassPlan`` is appended to.
    Returns:
        [N, L] float64, the numbers of ``musc_fast.ops.mutual_scores`` for the same provider.
    """
    n, length, _ = z.shape
    k_min, k_max = interval_bounds(n - 1, topmin, compat=compat)
    pp = plan_pass("msm", n=n, length=length, device=z.device, dtype=z.dtype, precision=precision,
                   window=window, memory=plan, sample=z)
    out = run_msm(z, pp, k_min, k_max)
    if plans is not None:
        plans.append(pp)
    return out


def full_similarity(z: torch.Tensor, *, precision: str = "fp32", block_elems: int | None = None,
                    window: int | None = None) -> torch.Tensor:
    """sim [N, L, N] float32 of a full pass by the planned provider (the aligned window's shift path for
    small windows computes row groups; the masked product keeps the symmetric schedule)."""
    mem = MemoryPlan() if block_elems is None else MemoryPlan(block_elems=block_elems)
    pp = plan_pass("msm", n=z.shape[0], length=z.shape[1], device=z.device, dtype=z.dtype, precision=precision,
                   window=window, memory=mem)
    return nearest_table(z, pp)
