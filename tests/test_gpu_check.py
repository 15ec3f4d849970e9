"""bench/gpu_check.sh --dry-run: every step's command line, imports and files checked on the CPU, so that a
typo cannot waste a GPU lease (issue 11: "bash bench/gpu_check.sh --dry-run passes in CI")."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("imports", "env", "msm-n200", "tests-gpu", "e2e-n200", "msm-n1000", "tests-compiled")


def _dry_run(tmp_path, **env):
    full = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), **env}
    return subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=600)


def test_gpu_check_dry_run_passes(tmp_path):
    pytest.importorskip("timm")
    res = _dry_run(tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "failed steps: 0" in log
    for name in STEPS:
        assert f"[{name}] rc=0" in log, name
    # what comes back from the device is at most 8 files, no deeper than 2 folders
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 3 for p in files), files


def test_gpu_check_dry_run_fails_when_the_steps_outgrow_the_budget(tmp_path):
    pytest.importorskip("timm")
    res = _dry_run(tmp_path, GPU_CHECK_BUDGET_S="300")
    assert res.returncode != 0
    assert "do not fit" in (tmp_path / "gpu_check.log").read_text()
