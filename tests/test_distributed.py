"""torch.distributed: a real 2-process gloo job on CPU gives bit-for-bit the one-process outputs (full
table, streaming, both aligned-window paths, and MuSc with batch-sharded backbone extraction)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from musc_fast import distributed
from tests.production_support import cases

REPO = Path(__file__).resolve().parents[1]


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    assert distributed.local_indices(10, 4) is None  # nothing to shard
    assert distributed.min_over_ranks(123) == 123


def test_shard_by_cost_is_balanced_and_deterministic():
    costs = [9, 1, 1, 5, 5, 3, 2, 2, 8, 4]
    owners = distributed.shard_by_cost(costs, 3)
    assert owners == distributed.shard_by_cost(costs, 3)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(load) - min(load) <= max(costs) and sum(load) == sum(costs)
    assert distributed.shard_by_cost(costs, 1) == [0] * len(costs)


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "dist.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "production_support.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' threading (matmul results may depend on it)
    try:
        ref = cases()
    finally:
        torch.set_num_threads(threads)
    got = np.load(out)
    assert sorted(got.files) == sorted(ref)
    for name, expect in ref.items():
        assert got[name].shape == expect.shape and np.isfinite(expect).all()
        np.testing.assert_array_equal(got[name], expect, err_msg=name)  # bitwise

