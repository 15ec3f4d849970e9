"""The one-Gram variant of the primitive: the same blocks of image pairs with an r axis. One Gram block
X_i X_J^T per task is box-filtered per degree r (``ops/boxgram.py``) and gives ``[R, N, L, N]`` tables of
every r at once. Providers: ``torch`` (the blocks of ``ops.boxgram``) and ``triton`` (the one-Gram
kernels of ``kernels/boxgram.py`` with the task's pairs as their work list) and ``native`` (CPU: torch
products, the filters, scales and maxima fused in ``kernels/boxgram_cpu.py``)."""
from __future__ import annotations

import torch

from ..ops import boxgram
from ..ops.lnamd import grid_of
from .tasks import task_pairs

PROVIDERS = ("torch", "native", "triton")


def table(x: torch.Tensor, r_list, tasks: list | None, *, provider: str, precision: str,
          block_elems: int) -> torch.Tensor:
    """x [N, L, C] LayerNorm'd tokens -> sim [R, N, L, N] float32 of the given one-Gram tasks
    ((i, j0, j1); None: every pair), -inf elsewhere and on the diagonal."""
    r_list = list(r_list)
    if provider == "triton":
        pairs = None if tasks is None else task_pairs(tasks)
        return boxgram.nearest_similarity_multi(x, r_list, precision=precision, block_elems=block_elems,
                                                which="triton", pairs=pairs)
    if provider == "native":
        return boxgram.nearest_similarity_multi_native(x, r_list, tasks=tasks, block_elems=block_elems)
    if tasks is None:
        return boxgram.nearest_similarity_multi_torch(x, r_list, precision=precision, block_elems=block_elems)
    n, length, _ = x.shape
    feats, by_patch, inv_norms = boxgram.boxgram_inputs(x, r_list, precision)
    sim = torch.full((len(r_list), n, length, n), float("-inf"), dtype=torch.float32, device=x.device)
    work = boxgram.boxgram_workspace(tasks, length, x.device) if tasks else None
    for task in tasks:
        boxgram.fill_boxgram_block(feats, by_patch, inv_norms, sim, task, grid_of(length), r_list, work)
    return sim
