"""Support for the production tests: seeded inputs (the backbone, ``FakeBackbone``, lives in
tests/fakes.py), and the worker that tests/test_distributed.py launches with
``python -m torch.distributed.run --nproc-per-node 2``.

Run as a script: ``production_support.py OUT.npz`` computes every case under torch.distributed and rank
0 writes the outputs; ``cases()`` computes the same cases in one process for comparison.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # launched as a script by torchrun: make ``musc_fast`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musc_fast.config import MuScConfig  # noqa: E402
from tests.fakes import FAKE_NAME, FakeBackbone, register_fake  # noqa: E402,F401  (re-exported)


def fake_config(**overrides) -> MuScConfig:
    base = dict(backbone=FAKE_NAME, pretrained=None, image_size=32, layers=(0, 1), r_list=(1, 3),
                batch_size=2, device="cpu", precision="fp32")
    return MuScConfig(**{**base, **overrides})


def fake_images(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, 32, 32] in [0, 1]: one shared pattern plus noise; image 1 has a bright square (a defect)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand((1, 3, 32, 32), generator=gen)
    x = (0.8 * base + 0.2 * torch.rand((n, 3, 32, 32), generator=gen)).clamp(0, 1)
    if n > 1:
        x[1, :, 8:16, 16:24] = 1.0
    return x


def random_layers(n: int, length: int, channels: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Seeded token layers [n, length, C] float32 with a shared per-position pattern."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in channels:
        proto = torch.randn((1, length, c), generator=gen)
        out.append(proto + 0.7 * torch.randn((n, length, c), generator=gen))
    return out


def cases() -> dict[str, np.ndarray]:
    """Every case the distributed test compares; patch scores [N, G, G] float64 (and image scores)."""
    from musc_fast import MuSc, score_features
    from musc_fast.memory import MemoryPlan

    out: dict[str, np.ndarray] = {}
    layers = random_layers(9, 49, (16, 12), seed=1)
    for name, switch in (("full", "1"), ("full_per_r", "0")):  # the one-Gram path and the per-r passes
        os.environ["MUSC_FAST_BOXGRAM"] = switch
        try:
            out[name] = score_features(layers, None, image_size=28, r_list=(1, 3),
                                       memory=MemoryPlan(block_elems=3 * 49 * 49)).patch_scores
        finally:
            del os.environ["MUSC_FAST_BOXGRAM"]
    stream = score_features(layers, None, image_size=28, r_list=(1, 3),
                            memory=MemoryPlan(stream_rows=2, lnamd_all_r=False))
    out["stream"] = stream.patch_scores
    aligned = score_features(layers, None, image_size=28, r_list=(1,), aligned_window=1, memory=MemoryPlan())
    out["aligned_shift"] = aligned.patch_scores
    masked = score_features(layers, None, image_size=28, r_list=(1,), aligned_window=3, memory=MemoryPlan())
    out["aligned_mask"] = masked.patch_scores
    model = MuSc(fake_config(rscin_k=(1, 2)), backbone=FakeBackbone())
    res = model.score(fake_images(7), progress=False)
    out["musc_patch"] = res.patch_scores
    out["musc_image"] = res.image_scores
    return out


def main(path: str) -> None:
    from musc_fast import distributed

    torch.set_num_threads(1)  # the same matmul threading as the one-process comparison
    assert distributed.init_from_env(), "expected torchrun's environment"
    assert distributed.world_size() == 2
    results = cases()
    if distributed.is_main_process():
        np.savez(path, **results)
    distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
