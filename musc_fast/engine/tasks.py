"""Task lists of the engine's modes and which rank owns which task.

A task is a block of image pairs. Two shapes:

* ``(i0, i1, j0, j1)``: query images [i0, i1) against partner images [j0, j1). In the *pairs* schedule
  (``ops.msm.pair_tasks``: j0 >= i1, each unordered pair once) a task gives both directions; in the
  *rows* schedule (row groups, cross scoring) only the rows [i0, i1).
* ``(i, j0, j1)``: the one-Gram blocks (``ops.boxgram.boxgram_tasks``): image i against partners [j0, j1).

Every table entry is written by exactly one task, so tasks can run on different ranks and be merged
with an elementwise max (tables) or sum (score rows).
"""
from __future__ import annotations

from .. import distributed
from ..memory import row_groups
from ..ops.boxgram import boxgram_tasks
from ..ops.msm import pair_tasks

Task = tuple[int, ...]

__all__ = ["Task", "pair_tasks", "boxgram_tasks", "row_groups", "owned", "owned_groups", "task_pairs"]


def owned(tasks: list[Task]) -> list[Task]:
    """The tasks of this rank: dealt by cost (pairs in the block), largest first to the least loaded rank
    (``distributed.shard_by_cost``); all of them when running alone."""
    if distributed.world_size() == 1:
        return list(tasks)
    costs = [(t[1] - t[0]) * (t[3] - t[2]) if len(t) == 4 else t[2] - t[1] for t in tasks]
    return [t for t, mine in zip(tasks, distributed.owners_by_cost(costs)) if mine]


def owned_groups(groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row groups of this rank: round robin (groups k, k + K, ...)."""
    return [g for g, mine in zip(groups, distributed.owners_round_robin(len(groups))) if mine]


def task_pairs(tasks: list[Task]) -> list[tuple[int, int]]:
    """Image pairs (i, j) of a task list, for providers that take a pair list (the Triton kernels)."""
    out = []
    for t in tasks:
        if len(t) == 4:
            i0, i1, j0, j1 = t
        else:
            i0, i1, j0, j1 = t[0], t[0] + 1, t[1], t[2]
        out.extend((i, j) for i in range(i0, i1) for j in range(j0, j1) if i != j)
    return out
