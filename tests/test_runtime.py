"""Backbone runtimes (ONNX Runtime, OpenVINO) against torch eager: tokens, and `musc-fast run` metrics/scores."""
from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from musc_fast.cli import main
from musc_fast.runtimes import available_runtimes, resolve_runtime
from musc_fast.runtimes.runtime import RuntimeBackbone
from tests.conftest import shared_path

RUNTIMES = ["onnxruntime", "openvino"]


def _need(rt: str) -> None:
    if rt not in available_runtimes():
        pytest.skip(f"{rt} is not installed (pip install 'musc-fast[onnx,openvino]')")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "runtime_cache"))


@pytest.fixture(scope="module")
def offline_backbone():
    from musc_fast.backbones import build_backbone

    return build_backbone("efficientnet_lite0", pretrained="imagenet", image_size=128, layers=(2, 3, 4))


@pytest.mark.parametrize("rt", RUNTIMES)
def test_tokens_match_torch_on_random_batches(rt, offline_backbone):
    _need(rt)
    run = RuntimeBackbone(offline_backbone, rt)
    for b in (1, 3):  # the batch axis is dynamic, awkward sizes included
        x = torch.randn(b, 3, 128, 128)
        with torch.inference_mode():
            ref = offline_backbone(x)
        out = run(x)
        for a, r in zip(out.tokens + [out.cls], ref.tokens + [ref.cls]):
            assert a.shape == r.shape and a.dtype == torch.float32
            assert float((a - r).abs().max()) < 5e-4
        assert run(x, need_cls=False).cls is None


def test_corrupt_cache_is_rebuilt_with_a_warning(offline_backbone):
    _need("onnxruntime")
    first = RuntimeBackbone(offline_backbone, "onnxruntime")
    first.path.write_bytes(b"not an onnx file")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = RuntimeBackbone(offline_backbone, "onnxruntime")
    assert again.path == first.path and again.path.stat().st_size > 1000
    x = torch.randn(2, 3, 128, 128)
    assert again(x).tokens[0].shape == (2, 64, 40)


def test_auto_picks_the_table_on_cpu_and_torch_on_cuda():
    have = available_runtimes()
    cpu = resolve_runtime("auto", "efficientnet_lite0", torch.device("cpu"))
    assert cpu == next((r for r in ("openvino", "onnxruntime") if r in have), "torch")
    assert resolve_runtime("auto", "efficientnet_lite0", torch.device("cuda")) == "torch"
    assert resolve_runtime("auto", "tiny_test", torch.device("cpu")) == "torch"


def test_unknown_or_missing_runtime_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--dataset", "synthetic", "--data-path", str(tmp_path), "--runtime", "tensorrt"])
    assert exc.value.code == 2


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    """A copy of an MVTec-layout category with the first ``per_class`` test images of each class (+ masks)."""
    for cls_dir in sorted((src / "test").iterdir()):
        for img in sorted(cls_dir.iterdir())[:per_class]:
            out = dst / "test" / cls_dir.name / img.name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(img, out)
            if cls_dir.name != "good":
                for m in (src / "ground_truth" / cls_dir.name).glob(img.stem + "*"):
                    (dst / "ground_truth" / cls_dir.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(m, dst / "ground_truth" / cls_dir.name / m.name)
    return dst


def _run(data_root: Path, category: str, out: Path, runtime: str) -> tuple[dict, dict]:
    dataset = "mvtec" if category == "bottle" else "folder"
    args = ["run", "--dataset", dataset, "--data-path", str(data_root), "--category", category, "--out", str(out),
            "--preset", "offline", "--image-size", "128", "--device", "cpu", "--no-progress", "--num-workers", "0",
            "--runtime", runtime]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    res = next(out.rglob("results.json"))
    metrics = json.loads(res.read_text())["categories"][category]["metrics"]
    scores = {r["path"]: float(r["score"]) for r in csv.DictReader(open(next(out.rglob("scores.csv"))))}
    return metrics, scores


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    bottle = shared_path("datasets", "mvtec_bottle")
    mtd = shared_path("datasets", "mtd")
    root = tmp_path_factory.mktemp("mtd_subset")
    _subset(mtd / "magnetic_tile", root / "magnetic_tile", per_class=8)
    return {"bottle": bottle, "magnetic_tile": root}


@pytest.fixture(scope="module")
def torch_runs(datasets, tmp_path_factory):
    return {cat: _run(root, cat, tmp_path_factory.mktemp(f"torch_{cat}"), "torch") for cat, root in datasets.items()}


@pytest.mark.parametrize("rt", RUNTIMES)
@pytest.mark.parametrize("category", ["bottle", "magnetic_tile"])
def test_run_metrics_and_scores_match_torch(rt, category, datasets, torch_runs, tmp_path):
    _need(rt)
    metrics, scores = _run(datasets[category], category, tmp_path / "out", rt)
    ref_metrics, ref_scores = torch_runs[category]
    assert set(metrics) == set(ref_metrics) and scores.keys() == ref_scores.keys() and len(scores) > 10
    for k, v in ref_metrics.items():
        if isinstance(v, (int, float)):
            assert metrics[k] == pytest.approx(v, abs=0.01), k
    worst = max(abs(scores[p] - ref_scores[p]) for p in scores)
    assert worst < 1e-4, worst


def test_runtime_not_installed_fails_before_any_work(monkeypatch):
    import musc_fast.runtimes.runtime as rt
    from musc_fast import MuSc, MuScConfig

    monkeypatch.setattr(rt, "available_runtimes", lambda: ["torch"])
    with pytest.raises(ValueError, match="not installed: pip install 'musc-fast\\[openvino\\]'"):
        MuSc(MuScConfig.preset("offline", device="cpu", runtime="openvino"))
    # auto falls back to torch when nothing faster is there
    assert MuSc(MuScConfig.preset("offline", device="cpu", runtime="auto")).runtime == "torch"
