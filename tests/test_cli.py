"""The CLI and the evaluation runner end to end on a tiny synthetic set with the tiny test backbone."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import tests.fakes  # noqa: F401  (registers the tiny_test backbone)
from musc_fast.cli import main
from musc_fast.data import generate_synthetic

TINY = ["--backbone", "tiny_test", "--pretrained", "none", "--image-size", "64", "--layers", "0", "2",
        "--device", "cpu", "--no-progress", "--num-workers", "0"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", n_good=6, n_defect=6, n_train=0, size=64)


def test_run_writes_every_output(tmp_path, synthetic_root, capsys):
    out = tmp_path / "out"
    code = main(["run", "--dataset", "synthetic", "--data-path", str(synthetic_root), "--out", str(out),
                 "--vis", "overlay", "--save-xlsx", *TINY])
    printed = capsys.readouterr().out
    assert code == 0, printed
    root = out / "synthetic" / "tiny_test" / "imagesize64"
    assert "mean" in printed and "auroc_px" in printed
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert [r["category"] for r in rows] == ["object", "texture", "mean"]
    data = json.loads((root / "results.json").read_text())
    for cat in ("object", "texture"):
        m = data["categories"][cat]["metrics"]
        assert all(0 <= m[k] <= 100 for k in ("auroc_sp", "auroc_px", "aupro", "aupro_mvtec"))
        # CSV and JSON carry the same numbers.
        row = next(r for r in rows if r["category"] == cat)
        assert float(row["auroc_px"]) == pytest.approx(m["auroc_px"], abs=1e-9)
        assert set(data["categories"][cat]["timings_ms_per_image"]) >= {"backbone", "msm", "total"}
        scores = list(csv.DictReader(open(root / cat / "scores.csv")))
        assert len(scores) == 12 and {"path", "label", "raw_score", "score"} <= set(scores[0])
        pngs = sorted((root / cat / "overlay").rglob("*.png"))
        assert len(pngs) == 24  # 12 images at S and at full resolution
    assert (root / "results.xlsx").is_file()
    from openpyxl import load_workbook

    ws = load_workbook(root / "results.xlsx")["MuSc_results"]
    assert [c.value for c in ws[1]][1:] == ["auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp"]
    assert ws.cell(row=ws.max_row, column=1).value == "mean"


def test_single_norm_writes_only_defective_images(tmp_path, synthetic_root):
    out = tmp_path / "out"
    assert main(["run", "--dataset", "synthetic", "--data-path", str(synthetic_root), "--category", "texture",
                 "--out", str(out), "--vis", "single_norm", *TINY]) == 0
    pngs = list((out / "synthetic" / "tiny_test" / "imagesize64" / "texture" / "single_norm").rglob("*.png"))
    assert len(pngs) == 12 and not any("good" in p.parts for p in pngs)


def test_yaml_config_and_cli_override(tmp_path, synthetic_root):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: synthetic\ndata_path: {synthetic_root}\ncategory: object\nimage_size: 32\n"
                   f"r_list: [1, 3]\nout: {tmp_path / 'o'}\n")
    assert main(["run", "--config", str(cfg), *TINY]) == 0  # --image-size 64 on the CLI wins over 32
    data = json.loads((tmp_path / "o" / "synthetic" / "tiny_test" / "imagesize64" / "results.json").read_text())
    assert data["config"]["r_list"] == [1, 3] and data["config"]["image_size"] == 64
    assert list(data["categories"]) == ["object"]


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "mvtec", "--data-path", "/nonexistent/x"], "/nonexistent/x"),
    (["--dataset", "nosuch", "--data-path", "."], "nosuch"),
    (["--dataset", "synthetic"], "--data-path is required"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, expected):
    code = main(["run", *args, "--out", str(tmp_path), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_category_fails_before_anything_is_scored(tmp_path, synthetic_root, capsys):
    code = main(["run", "--dataset", "synthetic", "--data-path", str(synthetic_root), "--category", "texture",
                 "nosuch", "--out", str(tmp_path), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nosuch" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))  # the preflight lists every category before scoring


def test_failed_category_does_not_stop_the_others(tmp_path, synthetic_root, capsys, monkeypatch):
    from musc_fast import runner

    real = runner.score_category

    def flaky(model, category, **kw):
        if category.name == "object":
            raise RuntimeError("simulated failure\nwith a second line")
        return real(model, category, **kw)

    monkeypatch.setattr(runner, "score_category", flaky)
    code = main(["run", "--dataset", "synthetic", "--data-path", str(synthetic_root), "--out", str(tmp_path), *TINY])
    captured = capsys.readouterr()
    assert code == 1 and "FAILED object: simulated failure with a second line" in captured.err
    root = tmp_path / "synthetic" / "tiny_test" / "imagesize64"
    data = json.loads((root / "results.json").read_text())
    assert list(data["categories"]) == ["texture"] and "object" in data["failures"]
    assert (root / "texture" / "result.json").is_file() and not (root / "object" / "result.json").exists()


def test_console_script_and_env():
    out = subprocess.run([sys.executable, "-m", "musc_fast.cli", "env"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "msm backend" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "musc_fast.cli", "run", "--dataset", "mvtec", "--data-path",
                          "/nonexistent"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "/nonexistent" in bad.stderr


def test_outputs_are_atomic_and_names_safe(tmp_path):
    from musc_fast import outputs

    outputs.write_text_atomic(tmp_path / "a" / "x.txt", "hello")
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp file left
    assert outputs.safe_component("../../etc") == "_.._etc"
    assert "/" not in outputs.safe_component("a/b") and outputs.safe_component("..") == "_"


def test_jet_and_overlay():
    from PIL import Image

    from musc_fast import viz

    rgb = viz.jet(np.array([[0.0, 0.5, 1.0]]))
    assert tuple(rgb[0, 0]) == (0, 0, 128) and tuple(rgb[0, 2]) == (128, 0, 0)  # dark blue .. dark red
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    pic = viz.overlay(Image.new("L", (40, 30), 128), np.linspace(0, 1, 256).reshape(16, 16), mask, 0.5)
    assert pic.size == (40, 30) and pic.mode == "RGB"
    assert (np.asarray(pic) == 255).all(axis=-1).any()  # the white GT contour is drawn


def test_bench_passes_every_argument_to_the_ladder(monkeypatch):
    import runpy

    seen = {}
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: seen.update(path=path, argv=list(sys.argv)))
    assert main(["bench", "--quick", "--out", "x.csv", "--rows", "original"]) == 0
    assert seen["path"].endswith("bench_e2e.py")
    assert seen["argv"][1:] == ["--quick", "--out", "x.csv", "--rows", "original"]
