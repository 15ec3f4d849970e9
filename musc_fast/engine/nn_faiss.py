"""The FAISS provider of the nearest-similarity primitive (exact inner-product search, k = 1;
``kernels/faiss_nn.py``). FAISS gives one direction per search, so a symmetric task costs two
searches (no saving from symmetry) and every precision computes in float32."""
from __future__ import annotations

import torch

from .. import kernels
from . import nn_torch

NAME = "faiss"


def why_not(schedule: str, window: int | None, device: torch.device, precision: str) -> str | None:
    if window is not None:
        return "has no aligned-window search"
    ok, why = kernels.faiss_available()
    return None if ok else f"cannot run here ({why})"


def pairs_table(z: torch.Tensor, tasks: list | None, *, precision: str, window: int | None,
                block_elems: int) -> torch.Tensor:
    if tasks is None:
        return kernels.nearest_similarity_faiss(z, precision=precision)
    n, length, _ = z.shape
    sim = torch.full((n, length, n), float("-inf"), dtype=torch.float32, device=z.device)
    for i0, i1, j0, j1 in tasks:
        sim[i0:i1, :, j0:j1] = kernels.cross_similarity_faiss(z[i0:i1], z[j0:j1])
        sim[j0:j1, :, i0:i1] = kernels.cross_similarity_faiss(z[j0:j1], z[i0:i1])
    return sim


def cross_table(za: torch.Tensor, zb: torch.Tensor, *, precision: str, window: int | None, block_elems: int,
                self_offset: int | None = None) -> torch.Tensor:
    return nn_torch.mask_self(kernels.cross_similarity_faiss(za, zb), self_offset)
