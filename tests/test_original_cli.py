"""The original MuSc script's interface (SPEC 8.1): its YAML sections and underscore flags, through `musc-fast`."""
from __future__ import annotations

import subprocess
import sys

import pytest

from musc_fast import original_cli
from tests.conftest import REPO, shared_path

# configs/musc.yaml of the original, written out from SPEC 8.1's table (the original's defaults).
ORIGINAL_YAML = """\
datasets:
  dataset_name: 'mvtec_ad'
  data_path: ./data/mvtec_anomaly_detection/
  class_name: 'ALL'
  img_resize: 518
  divide_num: 1
models:
  backbone_name: 'ViT-L-14-336'
  pretrained: 'openai'
  feature_layers: [5, 11, 17, 23]
  r_list: [1, 3, 5]
device: 0
testing:
  output_dir: 'output'
  vis: True
  save_excel: True
"""

# scripts/musc.sh's MVTec line, with the three substitutions of issue 13, and --img_resize 128 for CI time.
MUSC_SH_MVTEC = ("--device 1 --data_path {data} --dataset_name mvtec_ad --class_name bottle "
                 "--backbone_name efficientnet_lite0 --pretrained openai --feature_layers 5 11 17 23 "
                 "--img_resize 518 --divide_num 1 --r_list 1 3 5 --output_dir {out} --vis True --save_excel True "
                 "--img_resize 128")


def _settings(argv):
    args = original_cli.build_parser().parse_args(argv)
    return original_cli.translate(original_cli.original_settings(args))


def test_format_detection(tmp_path):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(ORIGINAL_YAML)
    ours = tmp_path / "ours.yaml"
    ours.write_text("dataset: mvtec\nimage_size: 256\n")
    assert original_cli.looks_original(["--config", str(cfg)])
    assert original_cli.looks_original(["run", "--config", str(cfg)])
    assert original_cli.looks_original(["--data_path", "x", "--class_name", "ALL"])
    assert not original_cli.looks_original(["run", "--config", str(ours)])
    assert not original_cli.looks_original(["run", "--dataset", "mvtec", "--data-path", "x"])
    assert not original_cli.looks_original(["env"])
    assert not original_cli.looks_original(["bank", "--data_path", "x"])  # another subcommand: its own parser


def test_original_yaml_loads_and_flags_win(tmp_path):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(ORIGINAL_YAML)
    s = _settings(["--config", str(cfg)])
    assert s["dataset"] == "mvtec_ad" and s["category"] == ["all"]
    assert s["data_path"] == "./data/mvtec_anomaly_detection/"
    assert (s["backbone"], s["pretrained"], s["image_size"]) == ("ViT-L-14-336", "openai", 518)
    assert s["layers"] == [5, 11, 17, 23] and s["r_list"] == [1, 3, 5] and s["divide_num"] == 1
    assert s["vis"] == "single_norm" and s["save_xlsx"] is True and s["out"] == "output"
    assert s["batch_size"] == 4  # the original's default; the YAML has no batch_size
    # flags over the file, as in musc_main.py
    s = _settings(["--config", str(cfg), "--img_resize", "256", "--class_name", "bottle", "--vis", "false",
                   "--r_list", "1", "--device", "cpu"])
    assert s["image_size"] == 256 and s["category"] == ["bottle"] and s["vis"] is None and s["r_list"] == [1]
    assert s["device"] == "cpu"
    # and the translated settings make a valid MuScConfig
    from musc_fast.cli import config_from_settings

    config = config_from_settings(s)
    assert config.image_size == 256 and config.layers == (5, 11, 17, 23) and config.batch_size == 4


@pytest.mark.parametrize("argv, message", [
    (["--vis", "perhaps", "--data_path", "."], "expected true or false"),
    (["--config", "{cfg}"], "unknown keys in models: backbone"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, argv, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  backbone: ViT-B-16\n")
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "musc_fast.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_run_with_the_original_yaml_goes_through_the_translation(tmp_path):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(ORIGINAL_YAML.replace("./data/mvtec_anomaly_detection/", str(tmp_path / "absent")))
    proc = subprocess.run([sys.executable, "-m", "musc_fast.cli", "run", "--config", str(cfg), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "absent" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def _xlsx_rows(path):
    from openpyxl import load_workbook

    ws = load_workbook(path)["MuSc_results"]
    return [[c.value for c in row] for row in ws.iter_rows()]


@pytest.mark.slow
def test_musc_sh_mvtec_line_matches_musc_fast_run(tmp_path):
    data = shared_path("datasets", "mvtec_bottle")
    orig_out, our_out = tmp_path / "orig", tmp_path / "ours"
    argv = MUSC_SH_MVTEC.format(data=data, out=orig_out).split()
    proc = subprocess.run([sys.executable, "-m", "musc_fast.cli", *argv, "--no-progress"], capture_output=True,
                          text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using 'imagenet'" in proc.stderr and "using [2, 3, 4]" in proc.stderr  # said, not silent
    proc = subprocess.run([sys.executable, "-m", "musc_fast.cli", "run", "--dataset", "mvtec", "--data-path", str(data),
                           "--category", "bottle", "--backbone", "efficientnet_lite0", "--image-size", "128",
                           "--batch-size", "4", "--device", "cpu", "--save-xlsx", "--out", str(our_out),
                           "--no-progress"], capture_output=True, text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the original's layout: <output_dir>/<dataset_name>/<backbone_name>/imagesize<S>/results.xlsx
    orig_root = orig_out / "mvtec_ad" / "efficientnet_lite0" / "imagesize128"
    orig = _xlsx_rows(orig_root / "results.xlsx")
    ours = _xlsx_rows(our_out / "mvtec" / "efficientnet_lite0" / "imagesize128" / "results.xlsx")
    assert orig[0][1:] == ["auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp"]
    assert [r[0] for r in orig] == [orig[0][0], "bottle", "mean"]
    assert orig == ours
    assert orig[1][5] is not None and orig[1][5] > 90  # auroc_sp, x100; this bottle copy has no masks
    # --vis True with the default single_norm: heat maps of the defective images only
    maps = list((orig_root / "bottle").rglob("*.png"))
    assert maps and not any("good" in p.parts for p in maps)
