"""Helpers for the reliability tests: tiny data sets built on the fly, the CLI run in-process, and test
backbones that misbehave on purpose (``tiny_nan``: NaN tokens for constant images; ``tiny_slow``: sleeps
``MUSC_FAST_TEST_SLEEP`` seconds per batch, so that a subprocess can be interrupted mid-run).

Importing this module registers those backbones (and ``tiny_test`` through ``tests.fakes``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

import tests.fakes  # noqa: F401  (registers tiny_test)
from musc_fast.backbones import BackboneOutput, register_backbone
from musc_fast.backbones.base import _REGISTRY
from musc_fast.cli import main
from musc_fast.data import generate_synthetic
from tests.fakes import TinyBackbone

TINY = ["--backbone", "tiny_test", "--pretrained", "none", "--image-size", "64", "--layers", "0", "2",
        "--device", "cpu", "--no-progress", "--num-workers", "0"]
SLEEP_ENV = "MUSC_FAST_TEST_SLEEP"


class NanBackbone(TinyBackbone):
    """``tiny_test`` whose tokens are NaN for images with constant pixels (a stand-in for fp16 overflow)."""

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        out = super().forward(images, need_cls)
        constant = (images.amax(dim=(2, 3)) == images.amin(dim=(2, 3))).all(dim=1)
        for t in out.tokens:
            t[constant] = float("nan")
        return out


class SlowBackbone(TinyBackbone):
    """``tiny_test`` that sleeps before each batch (environment variable ``MUSC_FAST_TEST_SLEEP``, s)."""

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
        return super().forward(images, need_cls)


def _register(name: str, cls: type) -> None:
    if name not in _REGISTRY:
        register_backbone(name)(lambda _n, *, layers, **kw: cls(layers))


_register("tiny_nan", NanBackbone)
_register("tiny_slow", SlowBackbone)

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
