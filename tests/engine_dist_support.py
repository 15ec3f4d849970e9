"""Sharded engine passes: ``cases()`` computes them in one process; run as a script under
``python -m torch.distributed.run --nproc-per-node 2`` (tests/test_engine.py),
the same cases run sharded over two gloo ranks and rank 0 writes them to OUT.npz. The provider is the
environment's ``MUSC_FAST_MSM`` (and ``MUSC_FAST_BOXGRAM=1`` for the one-Gram kernels)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musc_fast import engine  # noqa: E402
from musc_fast.memory import MemoryPlan  # noqa: E402
from musc_fast.ops import SmallBatchWarning, interval_bounds  # noqa: E402
from musc_fast.ops.lnamd import layer_norm_chw  # noqa: E402

N, G, C = 5, 4, 12


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(z [N, L, C] unit rows, x [N, L, C] LayerNorm'd tokens), seeded: the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    t = torch.randn((1, G * G, C), generator=gen) + torch.randn((N, G * G, C), generator=gen)
    return torch.nn.functional.normalize(t, dim=-1), layer_norm_chw(t)


def cases() -> dict[str, np.ndarray]:
    z, x = inputs()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        plans: list = []
        out["full"] = engine.score_pass(z, plans=plans).numpy()
        out["small_blocks"] = engine.score_pass(z, plan=MemoryPlan(block_elems=2 * 16 * 16), plans=plans).numpy()
        out["streaming"] = engine.score_pass(z, plan=MemoryPlan(stream_rows=2), plans=plans).numpy()
        out["window_shift"] = engine.score_pass(z, window=0, plans=plans).numpy()
        pp = engine.plan_pass("onegram", n=N, length=G * G, device="cpu", r_list=(1, 3),
                              memory=MemoryPlan(block_elems=2 * 16 * 16))
        k_min, k_max = interval_bounds(N - 1, (0.0, 0.3))
        out["onegram"] = engine.run_onegram(x, pp, k_min, k_max).numpy()
    out["providers"] = np.array([p.provider for p in plans + [pp]])
    out["ranks"] = np.array([p.ranks for p in plans + [pp]])
    return out


def main(path: str) -> None:
    from musc_fast import distributed

    torch.set_num_threads(1)
    assert distributed.init_from_env(backend="gloo") and distributed.world_size() == 2
    res = cases()
    if distributed.is_main_process():
        np.savez(path, **res)
    distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
