"""FAISS provider for MSM's nearest-patch step (SPEC 3.1): a benchmark baseline and a fallback.

For each image j an exact inner-product index (``IndexFlatIP``) over its L patches is searched with
every patch of every image, k = 1: the best inner product is ``max_q <Z_i[p], Z_j[q]>``, i.e. the
nearest patch for unit rows. This is the ordered-pair cost of the original (N^2 L^2 C, no symmetry),
computed by FAISS's BLAS-backed exact search with a k=1 heap instead of a stored distance matrix. FAISS
works in float32 only, so every ``precision`` gives the fp32 result. faiss-gpu is used when the input is
on CUDA and the installed faiss has GPU support; otherwise the data go through the CPU.
"""
from __future__ import annotations

import numpy as np
import torch


def nearest_similarity_faiss(z: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
    """Nearest-patch similarity for every ordered pair of distinct images, with FAISS.

    Args:
        z: [N, L, C] unit rows, any float dtype, any device.
        precision: accepted for interface parity; FAISS always computes in float32.
    Returns:
        sim: [N, L, N] float32 on z's device, ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>``, -inf for j == i.
    """
    import faiss

    if z.dim() != 3:
        raise ValueError(f"z must be [N, L, C], got shape {tuple(z.shape)}")
    n, length, c = z.shape
    zn = np.ascontiguousarray(z.detach().to("cpu", torch.float32).numpy())
    queries = zn.reshape(n * length, c)
    sim = np.empty((n, length, n), dtype=np.float32)
    gpu = z.device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    res = faiss.StandardGpuResources() if gpu else None
    for j in range(n):
        index = faiss.IndexFlatIP(c)
        if gpu:
            index = faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), index)
        index.add(zn[j])
        best, _ = index.search(queries, 1)  # [N*L, 1] largest inner products
        sim[:, :, j] = best.reshape(n, length)
    sim[np.arange(n), :, np.arange(n)] = -np.inf
    return torch.from_numpy(sim).to(z.device)


def cross_similarity_faiss(zq: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    """Nearest-patch similarity of query images in reference images with FAISS (one direction, no self
    exclusion): the engine's faiss provider for row groups, shards and bank scoring.

    Args:
        zq: [b, L, C] unit rows (queries). zr: [m, L', C] unit rows (references), any device.
    Returns:
        [b, L, m] float32 on zq's device, ``out[i, p, j] = max_q <zq[i, p], zr[j, q]>``.
    """
    import faiss

    if zq.dim() != 3 or zr.dim() != 3 or zq.shape[2] != zr.shape[2]:
        raise ValueError(f"expected [b, L, C] and [m, L, C], got {tuple(zq.shape)} and {tuple(zr.shape)}")
    b, length, c = zq.shape
    m = zr.shape[0]
    queries = np.ascontiguousarray(zq.detach().to("cpu", torch.float32).numpy()).reshape(b * length, c)
    refs = np.ascontiguousarray(zr.detach().to("cpu", torch.float32).numpy())
    out = np.empty((b, length, m), dtype=np.float32)
    for j in range(m):
        index = faiss.IndexFlatIP(c)
        index.add(refs[j])
        best, _ = index.search(queries, 1)
        out[:, :, j] = best.reshape(b, length)
    return torch.from_numpy(out).to(zq.device)
