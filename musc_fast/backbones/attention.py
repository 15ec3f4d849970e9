"""Multi-head attention for our ViT block forwards: torch SDPA (flash / memory-efficient kernels on CUDA),
or xformers' memory-efficient attention when it is installed and the tensors are on CUDA.

xformers is optional and guarded: ``MUSC_FAST_XFORMERS=0`` turns it off; any import problem falls back
to SDPA. Both compute softmax(Q K^T / sqrt(D)) V without materialising the attention weights.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:  # not installed, or built for another torch/CUDA: SDPA instead
        return None
    return xops


def attention_backend(device: torch.device | str) -> str:
    """``"xformers"`` or ``"sdpa"``: what ``attend`` uses for tensors on ``device``."""
    if os.environ.get("MUSC_FAST_XFORMERS", "1").strip() == "0" or torch.device(device).type != "cuda":
        return "sdpa"
    return "xformers" if _xformers_ops() is not None else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention of q, k, v [B, H, T, D] -> [B, H, T, D]."""
    if attention_backend(q.device) == "xformers":
        # xformers takes [B, T, H, D]
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
