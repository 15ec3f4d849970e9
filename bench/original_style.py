"""The original MuSc's post-backbone steps, written from SPEC 2-4 with the same cost structure: the
baseline rows of the benchmarks (never used by the package).

- LNAMD (SPEC 2): per batch of 4 images and per r, a fresh LayerNorm over (C, G, G), Unfold + adaptive
  average pooling for r > 1, the result moved to the CPU and L2-normalised there.
- MSM (SPEC 3.1): per (r, layer), Z uploaded to the device; for each query image the other images
  concatenated into Z_ref, cdist against it, min over each image's patches, two topk, mean, float64.
- Maps (SPEC 3.4, 4): mean over layers then r on the CPU in float64, bilinear upsampling on the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def lnamd_original(tokens: torch.Tensor, r: int, batch_size: int = 4) -> torch.Tensor:
    """One layer, one r: tokens [N, L, C] (device) -> Z [N, L, C] float32 on the CPU."""
    n, length, c = tokens.shape
    g = math.isqrt(length)
    out = []
    for b0 in range(0, n, batch_size):
        x = tokens[b0:b0 + batch_size].float().transpose(1, 2).reshape(-1, c, g, g)
        x = F.layer_norm(x, [c, g, g], eps=1e-5)
        if r > 1:
            patches = F.unfold(x, kernel_size=r, padding=(r - 1) // 2, stride=1)  # [B, C*r*r, L]
            patches = patches.transpose(1, 2).reshape(-1, length, c, r * r)
            x = patches.mean(-1)  # adaptive average pool of each (C*r*r) vector down to C
        else:
            x = x.flatten(2).transpose(1, 2)
        out.append(x.cpu())
    z = torch.cat(out)
    return z / z.norm(dim=-1, keepdim=True)


def msm_original(z: torch.Tensor, device: torch.device | str, topmin_max: float = 0.3) -> torch.Tensor:
    """Z [N, L, C] (CPU) -> [N, L] float64 with the original's per-query loop."""
    z = z.to(device)
    n, length, c = z.shape
    k = int(math.floor(topmin_max * (n - 1)))
    rows = []
    for i in range(n):
        ref = torch.cat([z[:i], z[i + 1:]]).reshape(-1, c)  # the (N-1) L x C copy of the original
        d = torch.cdist(z[i], ref).view(length, n - 1, length).min(-1).values
        smallest = torch.topk(d, k, dim=-1, largest=False).values
        rows.append(torch.topk(smallest, k, dim=-1).values.mean(-1).double().cpu())
    return torch.stack(rows)


def patch_scores_original(layer_tokens: list[torch.Tensor], r_list, device) -> torch.Tensor:
    """Mean over layers, then r, of the MSM maps (CPU float64): [N, L]."""
    per_r = []
    for r in r_list:
        maps = [msm_original(lnamd_original(t, r), device) for t in layer_tokens]
        per_r.append(torch.stack(maps).mean(0))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return torch.stack(per_r).mean(0)


def image_scores_original(patch: torch.Tensor, size: int, device) -> np.ndarray:
    g = math.isqrt(patch.shape[1])
    up = F.interpolate(patch.view(-1, 1, g, g).to(device), size=size, mode="bilinear", align_corners=True)
    return up.amax(dim=(1, 2, 3)).cpu().numpy()
