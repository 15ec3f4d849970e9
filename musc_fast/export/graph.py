"""The bank as one torch module: preprocessed images -> (image score, anomaly map), for export.

What ``Bank.score`` computes for a new image x (RsCIN off), as one graph:

    backbone taps -> per layer: LNAMD for every r (LayerNorm over the image's (C, G, G), r x r box
    mean, L2 rows) -> per (layer, r): sim[p, j] = max_q <Z_x[p], Z_j[q]> over the bank images j
    (one product [L, C] x [C, M*L], max over each image's L columns; the aligned window as a 0/-inf
    bias) -> the k_max largest per patch, distances sqrt(max(0, 2 - 2 s)) of sorted[k_min:k_max],
    their mean -> mean over (layer, r) -> bilinear upsampling (align_corners=True) -> max = score.

The bank's Z per (layer, r) are computed once with the engine's own LNAMD (``ops.lnamd_multi``) and
stored as constants [C, M*L] (transposed for the product). The graph computes in float32 where the
engine accumulates distances in float64: the difference stays below 1e-5 (tests/test_deploy.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lnamd import grid_of, lnamd_multi_torch
from ..ops.maps import upsample_maps
from ..ops.msm import window_bias


class BankGraph(nn.Module):
    """images [B, 3, S, S] float32 (preprocessed) -> (score [B] float32, anomaly_map [B, S, S] float32).

    Args:
        backbone: a ``Backbone`` on the CPU in float32, eval mode.
        bank_z: per tapped layer, per r: the bank's Z [M, L, C] float32 (unit rows).
        r_list: the LNAMD degrees, in the order of ``bank_z``'s inner lists.
        k_min, k_max: the interval of sorted per-image distances (``interval_bounds(M, topmin)``).
        image_size: S.
        window: the aligned-parts window (``MuScConfig.aligned_window``) or None (full search).
        storage: dtype the constants are stored in (float16 halves the file; computed in float32).
    """

    def __init__(self, backbone: nn.Module, bank_z: list[list[torch.Tensor]], r_list, k_min: int, k_max: int,
                 image_size: int, window: int | None = None, storage: torch.dtype = torch.float32):
        super().__init__()
        if not 0 <= k_min < k_max:
            raise ValueError(f"empty interval [{k_min}, {k_max}) of bank images: the bank is too small")
        self.backbone = backbone
        self.r_list = tuple(int(r) for r in r_list)
        self.k_min, self.k_max, self.image_size = int(k_min), int(k_max), int(image_size)
        m, length = bank_z[0][0].shape[:2]
        self.m, self.length, self.grid = int(m), int(length), grid_of(length)
        self.n_layers = len(bank_z)
        for li, zs in enumerate(bank_z):
            if len(zs) != len(self.r_list):
                raise ValueError(f"layer {li}: {len(zs)} Z tensors for {len(self.r_list)} degrees r")
            for ri, z in enumerate(zs):
                ref = z.detach().float().reshape(m * length, z.shape[2]).t().contiguous().to(storage)
                self.register_buffer(f"ref_{li}_{ri}", ref)  # [C, M*L]
        self.window = window
        if window is not None:
            self.register_buffer("bias", window_bias(self.grid, window))  # [L, L] 0 / -inf

    def forward(self, images: torch.Tensor):
        tokens = self.backbone(images, need_cls=False).tokens
        acc = None
        for li, layer in enumerate(tokens):
            for ri, zq in enumerate(lnamd_multi_torch(layer, self.r_list)):  # [B, L, C] float32
                ref = getattr(self, f"ref_{li}_{ri}").float()
                block = torch.matmul(zq, ref).reshape(-1, self.length, self.m, self.length)  # [B, L, M, L]
                if self.window is not None:
                    block = block + self.bias[None, :, None, :]
                sim = block.amax(dim=3)  # [B, L, M]: nearest patch in each bank image
                top = sim.topk(self.k_max, dim=-1, largest=True, sorted=True).values[..., self.k_min:]
                dist = (2.0 - 2.0 * top).clamp_min(0.0).sqrt().mean(dim=-1)  # [B, L]
                acc = dist if acc is None else acc + dist
        patch = acc / float(self.n_layers * len(self.r_list))
        maps = upsample_maps(patch.reshape(-1, self.grid, self.grid), self.image_size)  # [B, S, S]
        return maps.amax(dim=(1, 2)), maps
