"""Anomaly maps and image scores (SPEC 4): bilinear upsampling with align_corners=True, no blur, and the
image score is the max of the upsampled map (slightly below the grid max, and parity needs it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_maps(patch_scores: torch.Tensor, size: int) -> torch.Tensor:
    """[N, G, G] -> [N, S, S], same dtype (float64 for parity), bilinear, align_corners=True."""
    return F.interpolate(patch_scores[:, None], size=(size, size), mode="bilinear",
                         align_corners=True)[:, 0]


def maps_and_image_scores(patch_scores: torch.Tensor, size: int,
                          chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsampled maps and image scores, computed in float64 a chunk of images at a time.

    Args:
        patch_scores: [N, G, G] float64.
    Returns:
        (anomaly_maps [N, S, S] float32 on the CPU, image_scores [N] float64 on the CPU). The scores
        are the max of the float64 maps, before rounding to float32.
    """
    n = patch_scores.shape[0]
    maps = torch.empty((n, size, size), dtype=torch.float32)
    scores = torch.empty(n, dtype=torch.float64)
    for s0 in range(0, n, chunk):
        up = upsample_maps(patch_scores[s0:s0 + chunk].double(), size)
        scores[s0:s0 + chunk] = up.amax(dim=(1, 2)).cpu()
        maps[s0:s0 + chunk] = up.float().cpu()
    return maps, scores
