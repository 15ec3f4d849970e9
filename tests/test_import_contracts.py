"""The import contracts in pyproject.toml cover every module, and they hold (lint-imports, import-linter)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Packages/modules that may import the optional frontends (anomalib, lightning).
FRONTEND_HOMES = {"integrations"}


def _contracts() -> list[dict]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_anomalib_contract_lists_every_module_outside_integrations():
    """A module added later must be named in the contract, or it could import anomalib unchecked."""
    pkg = REPO / "musc_fast"
    top = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    top |= {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    expected = {f"musc_fast.{m}" for m in top - FRONTEND_HOMES}
    (contract,) = [c for c in _contracts() if "anomalib" in c.get("forbidden_modules", [])]
    assert set(contract["source_modules"]) == expected


def test_lint_imports_passes():
    exe = shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter, the 'test' extra) is not installed"
    res = subprocess.run([exe], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
