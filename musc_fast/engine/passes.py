"""Runs a ``PassPlan``: build the task list of its mode, keep this rank's tasks, call the provider,
merge over ranks, reduce with the interval mean.

    full/pairs     tasks = pair blocks         -> table [N, L, N]  -> all_reduce(MAX) -> interval mean
    full/rows      tasks = row groups          -> table rows       -> all_reduce(MAX) -> interval mean
    streaming      tasks = row groups          -> [b, L, N] each   -> interval mean -> all_reduce(SUM)
    onegram        tasks = one-Gram blocks     -> [R, N, L, N]     -> all_reduce(MAX) -> interval mean per r
    bank           one block of new images x a bank chunk -> [b, L, m] (the caller concatenates chunks)

Every table entry is written by exactly one task and the merges are exact (max with -inf, sum with 0),
so sharded, streaming and full runs of one provider agree bit for bit wherever their blocks are the same.
"""
from __future__ import annotations

import torch

from .. import distributed
from . import onegram
from .interval import interval_mean
from .plan import NN_PROVIDERS, PassPlan
from .tasks import boxgram_tasks, owned, owned_groups, pair_tasks, row_groups


def nearest_table(z: torch.Tensor, plan: PassPlan) -> torch.Tensor:
    """The [N, L, N] table of a ``full`` pass (merged over ranks), -inf on the diagonal."""
    nn = NN_PROVIDERS[plan.provider]
    n, length, _ = z.shape
    sharded = plan.ranks > 1
    kw = dict(precision=plan.precision, window=plan.window, block_elems=plan.block_elems)
    if plan.schedule == "pairs":
        tasks = owned(pair_tasks(n, length, plan.block_elems)) if sharded else None
        sim = nn.pairs_table(z, tasks, **kw)
    else:
        groups = row_groups(n, plan.rows)
        mine = owned_groups(groups) if sharded else groups
        sim = torch.full((n, length, n), float("-inf"), dtype=torch.float32, device=z.device) if sharded else \
            torch.empty((n, length, n), dtype=torch.float32, device=z.device)
        for i0, i1 in mine:
            sim[i0:i1] = nn.cross_table(z[i0:i1], z, self_offset=i0, **kw)
    if sharded:
        sim = distributed.all_reduce_max(sim)
    sim.diagonal(dim1=0, dim2=2).fill_(float("-inf"))
    return sim


def run_msm(z: torch.Tensor, plan: PassPlan, k_min: int, k_max: int) -> torch.Tensor:
    """One (r, layer) pass: z [N, L, C] unit rows -> [N, L] float64 MSM scores (the same on every rank)."""
    n, length, _ = z.shape
    if plan.mode == "full":
        sim = nearest_table(z, plan)
        return interval_mean(sim, k_min, k_max, provider=plan.interval, rows_per_chunk=plan.rows_per_chunk)
    if plan.mode != "streaming":
        raise ValueError(f"run_msm runs full and streaming passes, not {plan.mode!r}")
    nn = NN_PROVIDERS[plan.provider]
    groups = row_groups(n, plan.rows)
    sharded = plan.ranks > 1
    out = (torch.zeros if sharded else torch.empty)((n, length), dtype=torch.float64, device=z.device)
    for i0, i1 in (owned_groups(groups) if sharded else groups):
        rows = nn.cross_table(z[i0:i1], z, precision=plan.precision, window=plan.window,
                              block_elems=plan.block_elems, self_offset=i0)
        out[i0:i1] = interval_mean(rows, k_min, k_max, provider=plan.interval, rows_per_chunk=plan.rows_per_chunk,
                                   n_others=n - 1)
    return distributed.all_reduce_sum(out) if sharded else out


def run_onegram(x: torch.Tensor, plan: PassPlan, k_min: int, k_max: int) -> torch.Tensor:
    """Every r of one layer: x [N, L, C] LayerNorm'd tokens -> [R, N, L] float64 (the same on every rank)."""
    n, length, _ = x.shape
    sharded = plan.ranks > 1
    tasks = owned(boxgram_tasks(n, length, plan.block_elems)) if sharded else None
    sim = onegram.table(x, plan.r_list, tasks, provider=plan.provider, precision=plan.precision,
                        block_elems=plan.block_elems)
    if sharded:
        sim = distributed.all_reduce_max(sim)
    return torch.stack([interval_mean(s, k_min, k_max, provider=plan.interval, rows_per_chunk=64) for s in sim])


def cross_table(za: torch.Tensor, zb: torch.Tensor, plan: PassPlan) -> torch.Tensor:
    """The ``bank`` primitive: za [b, L, C] new images x zb [m, L, C] bank images -> [b, L, m] float32."""
    return NN_PROVIDERS[plan.provider].cross_table(za, zb, precision=plan.precision, window=plan.window,
                                                    block_elems=plan.block_elems)
