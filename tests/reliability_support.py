"""Helpers for the reliability tests: tiny data sets built on the fly, the CLI run in-process, with the
test backbones of tests/fakes.py (``tiny_test``, ``tiny_nan``, ``tiny_slow``) registered on import.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from musc_fast.cli import main
from musc_fast.data import generate_synthetic
from tests.fakes import SLEEP_ENV  # noqa: F401  (importing registers tiny_test, tiny_nan, tiny_slow)

TINY = ["--backbone", "tiny_test", "--pretrained", "none", "--image-size", "64", "--layers", "0", "2",
        "--device", "cpu", "--no-progress", "--num-workers", "0"]

_PRISTINE: dict[tuple, Path] = {}


def synthetic_copy(dest: Path, base: Path, categories=("texture",), n_good: int = 4, n_defect: int = 4) -> Path:
    """A fresh copy (at ``dest``) of a small synthetic set generated once under ``base``; tests may damage it."""
    key = (tuple(categories), n_good, n_defect)
    if key not in _PRISTINE or not _PRISTINE[key].is_dir():
        _PRISTINE[key] = generate_synthetic(base / f"pristine_{len(_PRISTINE)}", categories=categories,
                                            n_good=n_good, n_defect=n_defect, n_train=0, size=64)
    shutil.copytree(_PRISTINE[key], dest)
    return dest


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``musc-fast`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def out_root(out: Path, backbone: str = "tiny_test", dataset: str = "synthetic", size: int = 64) -> Path:
    return out / dataset / backbone / f"imagesize{size}"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def temp_files(folder: Path) -> list[Path]:
    """Leftover temporary files of the atomic writers."""
    return [p for p in Path(folder).rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
