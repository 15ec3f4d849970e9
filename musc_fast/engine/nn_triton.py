"""The Triton provider of the nearest-similarity primitive: the persistent mutual-min kernel with a
work list (``kernels/mutual_min.py``, ``pairs=``).

* ``pairs_table``: every pair (the kernel's own L2-ordered list) or the pairs of the given tasks (one
  rank's shard).
* ``cross_table``: the kernel multiplies image pairs of ONE tensor, so [za; zb_chunk] is concatenated
  and only the cross pairs (a, b + k) are listed; the table of a launch is (b' + m')^2 L floats, so za
  and zb are walked in chunks that keep it near ``4 * block_elems`` values. The column maxima of a
  chunk (zb's rows against za) are computed and dropped: extra table writes, no extra FLOPs.

No aligned-window mask in the kernel: the planner sends windowed passes to torch (``why_not``). Every
call goes through ``ops.run_kernel``: a kernel that fails its probe or a call falls back to torch with
one ``KernelFallbackWarning``.
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from ..ops import run_kernel
from . import nn_torch
from .tasks import task_pairs

NAME = "triton"


def why_not(schedule: str, window: int | None, device: torch.device, precision: str) -> str | None:
    if window is not None:
        return "has no aligned-window mask"
    ok, why = kernels.available()
    if not ok:
        return f"cannot run here ({why})"
    if torch.device(device).type != "cuda" and not kernels._interpreting():
        return "needs CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def pairs_table(z: torch.Tensor, tasks: list | None, *, precision: str, window: int | None,
                block_elems: int) -> torch.Tensor:
    pairs = None if tasks is None else task_pairs(tasks)
    return run_kernel(("mutual_min", precision), z.device,
                      lambda: kernels.nearest_similarity_triton(z, precision=precision, pairs=pairs),
                      lambda: nn_torch.pairs_table(z, tasks, precision=precision, window=None,
                                                   block_elems=block_elems))


def cross_table(za: torch.Tensor, zb: torch.Tensor, *, precision: str, window: int | None, block_elems: int,
                self_offset: int | None = None) -> torch.Tensor:
    b, length, _ = za.shape
    m = zb.shape[0]
    out = torch.empty((b, length, m), dtype=torch.float32, device=za.device)
    # images per launch: (rows + cols)^2 L table values near 4 * block_elems, rows at most half of them
    cap = max(2, math.isqrt(max(1, 4 * block_elems // max(1, length))))
    rows = max(1, min(b, cap // 2))
    step = max(1, cap - rows)
    for i0 in range(0, b, rows):
        i1 = min(b, i0 + rows)
        for j0 in range(0, m, step):
            j1 = min(m, j0 + step)
            off = None if self_offset is None else self_offset + i0 - j0
            out[i0:i1, :, j0:j1] = run_kernel(
                ("mutual_min", precision), za.device,
                lambda i0=i0, i1=i1, j0=j0, j1=j1, off=off: _cross_chunk(za[i0:i1], zb[j0:j1], precision, off),
                lambda i0=i0, i1=i1, j0=j0, j1=j1, off=off: nn_torch.cross_table(
                    za[i0:i1], zb[j0:j1], precision=precision, window=None, block_elems=block_elems,
                    self_offset=off))
    return out


def _cross_chunk(za: torch.Tensor, zr: torch.Tensor, precision: str, self_offset: int | None) -> torch.Tensor:
    """[b, L, m'] from one kernel launch on [za; zr] with the cross pairs only (self pairs left -inf)."""
    b, m = za.shape[0], zr.shape[0]
    a = torch.arange(b).repeat_interleave(m)
    k = torch.arange(m).repeat(b)
    if self_offset is not None:
        keep = a + self_offset != k
        a, k = a[keep], k[keep]
    both = torch.cat([za, zr.to(za.dtype)])
    sim = kernels.nearest_similarity_triton(both, precision=precision, pairs=(a, k + b))
    return sim[:b, :, b:]
