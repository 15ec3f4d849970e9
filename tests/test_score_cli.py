"""`musc-fast bank build` / `score` on real MVTec bottle images (efficientnet_lite0, 64 px, CPU): an
unreadable file is skipped and listed (``--strict``: exit 2), a progress bar (``--no-progress``), rows
written per chunk (a failure in chunk 2 keeps chunk 1's rows), ``--add-ok`` skips duplicates and keeps
the calibration valid, ``--backbone`` starts from its preset, bf16/fp16 end to end."""
from __future__ import annotations

import argparse
import csv
import shutil
import warnings

import numpy as np
import pytest

from musc_fast.bank import Bank
from musc_fast.cli_bank import add_bank_commands, run_bank_command
from musc_fast.config import PRESETS
from tests.conftest import shared_path

SIZE = 64
# bf16/fp16 backbone vs fp32, same images: image scores within this fraction of the fp32 scores' range
# (measured at 64 px: bf16 1.0 %, fp16 0.06 %).
LOW_PRECISION_REL = 0.05


def _parser():
    parser = argparse.ArgumentParser(prog="musc-fast")
    add_bank_commands(parser.add_subparsers(dest="command"))
    return parser


def _run(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-N interval warnings of a 4-image bank
        rc = run_bank_command(_parser().parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _build(capsys, folder, out, *extra):
    return _run(["bank", "build", "--out", out, folder, "--backbone", "efficientnet_lite0", "--image-size", SIZE,
                 "--device", "cpu", "--batch-size", 2, "--no-progress", *extra], capsys)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """good/ (4 train images for the bank), test/ (2 good + 2 broken_large + broken.png, not an image)."""
    root = shared_path("datasets", "mvtec_bottle", "bottle")
    tmp = tmp_path_factory.mktemp("score_cli")
    good, test = tmp / "good", tmp / "test"
    good.mkdir()
    test.mkdir()
    for i in range(4):
        shutil.copy(root / "train" / "good" / f"{i:03d}.png", good / f"{i:03d}.png")
    for kind, tag in (("good", "g"), ("broken_large", "b")):
        for i in range(2):
            shutil.copy(root / "test" / kind / f"{i:03d}.png", test / f"{tag}{i}.png")
    (test / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return tmp


@pytest.fixture(scope="module")
def bank_file(data):
    """A calibrated fp32 bank of good/ built through the CLI (module-wide; tests copy it to change it)."""
    capsys = _NoCapture()
    path = data / "bank.safetensors"
    rc, _, err = _build(capsys, data / "good", path, "--calibrate")
    assert rc == 0, err
    return path


class _NoCapture:
    def readouterr(self):
        return argparse.Namespace(out="", err="")


def _readable(data):
    return sorted(p for p in (data / "test").iterdir() if p.name != "broken.png")


def test_build_backbone_starts_from_its_preset(bank_file):
    c = Bank.load(bank_file).config
    preset = PRESETS["offline"]
    assert c.backbone == "efficientnet_lite0" and c.image_size == SIZE
    assert (c.layers, c.r_list, c.pretrained) == (preset.layers, preset.r_list, preset.pretrained)
    assert c.layers != PRESETS["paper"].layers


def test_score_skips_and_lists_unreadable(data, bank_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(["score", "--bank", bank_file, "--threshold-quantile", "1.0", "--out", out,
                            "--chunk", 2, data / "test"], capsys)
    assert rc == 0, err
    lines = [line.split("\t") for line in stdout.strip().splitlines()]
    assert [row[0] for row in lines] == [str(p) for p in _readable(data)]
    assert "skipped:" in err and "broken.png" in err and "skipped 1 of 5 images" in err
    with open(out / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [r["path"] for r in skipped] == [str(data / "test" / "broken.png")] and "cannot read" in skipped[0]["reason"]
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [row[0] for row in lines] and not (out / "scores.csv.partial").exists()
    # the rows are the library's scores of the readable images, and broken_large scores above good
    lib = Bank.load(bank_file).score([str(p) for p in _readable(data)])
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], lib.image_scores, rtol=0, atol=1e-6)
    by_name = {r["path"].rsplit("/", 1)[1]: float(r["image_score"]) for r in rows}
    assert min(by_name["b0.png"], by_name["b1.png"]) > max(by_name["g0.png"], by_name["g1.png"])
    # heat maps keep the input index in their names (the skipped file's index 2 has none)
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["0000_b0.png", "0001_b1.png", "0003_g0.png",
                                                                   "0004_g1.png"]


def test_score_strict_exits_2(data, bank_file, capsys):
    rc, _, err = _run(["score", "--bank", bank_file, "--strict", "--no-progress", data / "test"], capsys)
    assert rc == 2 and err.startswith("error:") and "broken.png" in err and err.count("\n") == 1


def test_score_all_unreadable_exits_2(data, bank_file, capsys):
    rc, _, err = _run(["score", "--bank", bank_file, "--no-progress", data / "test" / "broken.png"], capsys)
    assert rc == 2 and "none of the 1 images can be read" in err


def test_score_progress_bar(data, bank_file, capsys):
    images = [p for p in _readable(data)][:2]
    _, _, err = _run(["score", "--bank", bank_file, *images], capsys)
    assert "score" in err and "2/2" in err
    _, _, err = _run(["score", "--bank", bank_file, "--no-progress", *images], capsys)
    assert "2/2" not in err


def test_score_keeps_finished_rows_when_a_chunk_fails(data, bank_file, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = Bank._patch_scores

    def flaky(self, tokens, timer):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in chunk 2")
        return real(self, tokens, timer)

    monkeypatch.setattr(Bank, "_patch_scores", flaky)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "scores.csv").write_text("stale results of an earlier call\n")
    images = _readable(data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(["score", "--bank", bank_file, "--threshold", "0.3", "--out", out, "--chunk", 2, "--no-progress",
              *images], capsys)
    captured = capsys.readouterr()
    assert "2 finished rows are in" in captured.err
    assert [line.split("\t")[0] for line in captured.out.strip().splitlines()] == [str(p) for p in images[:2]]
    assert not (out / "scores.csv").exists()  # the stale file is gone; nothing claims to be complete
    with open(out / "scores.csv.partial", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(p) for p in images[:2]] and all(r["label"] in ("OK", "NG") for r in rows)
    assert len(list((out / "heatmaps").iterdir())) == 2 and len(list((out / "masks").iterdir())) == 2


def test_add_ok_twice_no_duplicates_keeps_calibration(data, bank_file, tmp_path, capsys):
    path = tmp_path / "bank.safetensors"
    shutil.copy(bank_file, path)
    new = [data / "test" / "g0.png", data / "test" / "g1.png"]
    copy_of_bank_image = tmp_path / "same_as_000.png"
    shutil.copy(data / "good" / "000.png", copy_of_bank_image)
    args = ["score", "--bank", path, "--threshold", "1e9", "--add-ok", "--no-progress"]
    rc, _, err = _run([*args, *new, copy_of_bank_image], capsys)
    assert rc == 0, err
    assert "added 2 OK images" in err and "not added (already in the bank)" in err and "same_as_000.png" in err
    bank = Bank.load(path)
    assert len(bank) == 6 and bank.names[-2:] == [str(p) for p in new]
    assert bank._loo is not None  # the stored calibration was recomputed for the 6 images, not dropped
    stored = bank.leave_one_out().raw_image_scores
    bank._loo = None
    np.testing.assert_allclose(stored, bank.leave_one_out().raw_image_scores, rtol=0, atol=1e-9)
    assert len(stored) == 6
    rc, _, err = _run([*args, *new], capsys)  # the same images again
    assert rc == 0 and "added" not in err.replace("not added", "") and err.count("not added") == 2
    again = Bank.load(path)
    assert len(again) == 6 and again.names == bank.names and again._loo is not None
    # a quantile threshold from the updated calibration works without recomputing
    rc, _, err = _run(["score", "--bank", path, "--threshold-quantile", "1.0", "--no-progress", new[0]], capsys)
    assert rc == 0 and "computing leave-one-out" not in err and "of 6 leave-one-out" in err


def test_edited_names_fail_to_load_in_one_line(bank_file, tmp_path, capsys):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(bank_file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    names = json.loads(meta["names"])
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={**meta, "names": json.dumps(names[::-1])})
    rc, _, err = _run(["bank", "info", edited], capsys)
    assert rc == 2 and "metadata checksum mismatch" in err and err.count("\n") == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_build_and_score_on_cpu(data, bank_file, precision, tmp_path, capsys):
    path = tmp_path / f"{precision}.safetensors"
    rc, _, err = _build(capsys, data / "good", path, "--precision", precision, "--calibrate")
    assert rc == 0, err
    bank = Bank.load(path)
    assert str(bank.tokens[0].dtype) == f"torch.{'bfloat16' if precision == 'bf16' else 'float16'}"
    images = _readable(data)
    rc, out, err = _run(["score", "--bank", path, "--threshold-quantile", "1.0", "--out", tmp_path / "o",
                         "--no-progress", *images], capsys)
    assert rc == 0, err
    low = np.array([float(line.split("\t")[1]) for line in out.strip().splitlines()])
    ref = Bank.load(bank_file).score([str(p) for p in images]).image_scores  # fp32 backbone
    assert np.all(np.isfinite(low)) and np.abs(low - ref).max() <= LOW_PRECISION_REL * np.ptp(ref)
    rc, out, err = _run(["score", "--bank", path, "--rscin", "--threshold", "0.5", "--no-progress", *images],
                        capsys)  # RsCIN over bank + new images (its class tokens in this dtype)
    assert rc == 0, err
    assert np.all(np.isfinite([float(line.split("\t")[1]) for line in out.strip().splitlines()]))


def test_score_rscin_with_a_quantile_threshold_fails_before_work(data, bank_file, capsys, monkeypatch):
    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(Bank, "model", no_backbone)
    rc, _, err = _run(["score", "--bank", bank_file, "--rscin", "--threshold-quantile", "0.9", data / "test"],
                      capsys)
    assert rc == 2 and "with --rscin use --threshold" in err
