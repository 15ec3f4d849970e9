"""The torch provider of the nearest-similarity primitive: chunked matmuls + amax (``ops/msm.py``).

Two entry points, as every provider:

* ``pairs_table(z, tasks, ...)``: the symmetric case. One product block ``Z_I Z_J^T`` per task gives
  row maxima (sim[I, :, J]) and column maxima (sim[J, :, I]); entries of no task stay -inf.
* ``cross_table(za, zb, ...)``: one direction, ``[b, L, m]``; with ``self_offset`` the entries where
  ``za[a]`` is ``zb[a + self_offset]`` are -inf (row groups of one set).

The aligned window is a -inf bias on the product (``pairs``) or grid shifts for small windows (``rows``).
"""
from __future__ import annotations

import torch

from ..ops.lnamd import grid_of
from ..ops.msm import (
    _matmul_dtype,
    block_workspace,
    cross_similarity_torch,
    fill_pair_block,
    nearest_similarity_torch,
    window_bias,
)

NAME = "torch"


def why_not(schedule: str, window: int | None, device: torch.device, precision: str) -> str | None:
    """None: the provider runs this pass (torch runs every schedule, window and precision)."""
    return None


def pairs_table(z: torch.Tensor, tasks: list | None, *, precision: str, window: int | None,
                block_elems: int) -> torch.Tensor:
    """z [N, L, C] unit rows -> sim [N, L, N] float32 of the given tasks (None: every pair), -inf elsewhere
    and on the diagonal."""
    if tasks is None:
        return nearest_similarity_torch(z, precision=precision, block_elems=block_elems, window=window)
    n, length, c = z.shape
    sim = torch.full((n, length, n), float("-inf"), dtype=torch.float32, device=z.device)
    flat = z.to(_matmul_dtype(z, precision)).reshape(n * length, c)
    bias = window_bias(grid_of(length), window, z.device) if window is not None else None
    work = block_workspace(tasks, length, z.device) if tasks else None
    for task in tasks:
        fill_pair_block(flat, sim, task, length, bias, work)
    return sim


def cross_table(za: torch.Tensor, zb: torch.Tensor, *, precision: str, window: int | None, block_elems: int,
                self_offset: int | None = None) -> torch.Tensor:
    """za [b, L, C], zb [m, L, C] -> [b, L, m] float32 row maxima (``ops.msm.cross_similarity_torch``)."""
    sim = cross_similarity_torch(za, zb, precision=precision, block_elems=block_elems, window=window)
    return mask_self(sim, self_offset)


def mask_self(sim: torch.Tensor, self_offset: int | None) -> torch.Tensor:
    """-inf where row image a is column image a + self_offset (in place; no-op for None)."""
    if self_offset is not None:
        b, m = sim.shape[0], sim.shape[2]
        k = torch.arange(max(0, -self_offset), min(b, m - self_offset), device=sim.device)
        sim[k, :, k + self_offset] = float("-inf")
    return sim
