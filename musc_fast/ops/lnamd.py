"""LNAMD in torch (SPEC 2): per-image LayerNorm over (C, G, G), r x r zero-padded box mean, L2-normalise.

Runs on any device. The LayerNorm is computed once per layer and shared by every r (the original
recomputes it for each r: same numbers, wasted work).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_of(length: int) -> int:
    """G for L = G * G patches; a non-square token count is an error (as in the original)."""
    g = math.isqrt(length)
    if g * g != length:
        raise ValueError(f"LNAMD needs a square patch grid, got L={length} tokens (not a square number)")
    return g


def layer_norm_chw(tokens: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """One mean and one biased variance per image over all its L*C values (``nn.LayerNorm([C, G, G])``
    with weight 1, bias 0).

    Args:
        tokens: [N, L, C] any float dtype.
    Returns:
        [N, L, C] float32.
    """
    x = tokens.float()
    var, mean = torch.var_mean(x, dim=(1, 2), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """r x r mean over the patch grid, stride 1, zero padding (r-1)/2, padded zeros counted.

    Args:
        x: [N, L, C] float32, L = G * G row-major.
    Returns:
        [N, L, C] float32.
    """
    if r == 1:
        return x
    n, length, c = x.shape
    g = grid_of(length)
    chw = x.transpose(1, 2).reshape(n, c, g, g)
    pooled = F.avg_pool2d(chw, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    return pooled.reshape(n, c, length).transpose(1, 2)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Unit rows along C. [..., C] -> [..., C]."""
    return F.normalize(x, p=2.0, dim=-1)


def lnamd_torch(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """LNAMD features of one layer for one degree r.

    Args:
        tokens: [N, L, C] patch tokens (no CLS), any float dtype.
        r: odd aggregation degree >= 1.
    Returns:
        Z: [N, L, C] float32 with unit rows.
    """
    _check_r(r)
    grid_of(tokens.shape[1])
    return l2_normalise(box_mean(layer_norm_chw(tokens), r))


def lnamd_multi_torch(tokens: torch.Tensor, r_list: tuple[int, ...] | list[int]) -> list[torch.Tensor]:
    """LNAMD for several r from one LayerNorm. Returns one [N, L, C] float32 Z per r, in order."""
    for r in r_list:
        _check_r(r)
    grid_of(tokens.shape[1])
    normed = layer_norm_chw(tokens)
    return [l2_normalise(box_mean(normed, r)) for r in r_list]


def _check_r(r: int) -> None:
    if int(r) != r or r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation degree r must be odd and positive, got {r}")
