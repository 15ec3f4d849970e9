"""No lost work: atomic writes (also when the disk is full), --resume after Ctrl-C, and bit-identical reruns."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musc_fast import outputs
from tests.reliability_support import SLEEP_ENV, TINY, out_root, read_json, run_cli, synthetic_copy, temp_files

REPO = Path(__file__).resolve().parents[1]
SLOW = [*TINY, "--backbone", "tiny_slow", "--batch-size", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("pristine")


@pytest.fixture
def data(tmp_path, base) -> Path:
    return synthetic_copy(tmp_path / "data", base)


def _numbers(doc):
    """results.json without what legitimately changes between runs (timings, which categories were reused)."""
    if isinstance(doc, dict):
        return {k: _numbers(v) for k, v in doc.items() if k not in ("timings_ms_per_image", "seconds", "resumed")}
    if isinstance(doc, list):
        return [_numbers(v) for v in doc]
    return doc


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".csv", ".png")}


# ------------------------------------------------------------------------------------------------
# determinism

def test_two_runs_are_bit_identical(tmp_path, data, capsys):
    for out in ("a", "b"):
        assert run_cli(capsys, "run", "--dataset", "synthetic", "--data-path", data, "--out", tmp_path / out,
                       *TINY, "--vis", "overlay")[0] == 0
    ra, rb = out_root(tmp_path / "a"), out_root(tmp_path / "b")
    fa, fb = _files(ra), _files(rb)
    assert len(fa) == 2 + 16 and fa == fb  # results.csv, scores.csv, 8 heat maps at S and at full size
    assert _numbers(read_json(ra / "results.json")) == _numbers(read_json(rb / "results.json"))


# ------------------------------------------------------------------------------------------------
# interrupted run + --resume == uninterrupted run

def _three_categories(data: Path, base: Path) -> Path:
    """object, texture, zeta (a copy of texture): a run long enough to interrupt in the middle."""
    both = synthetic_copy(data.parent / "three", base, categories=("object", "texture"))
    shutil.copytree(both / "texture", both / "zeta")
    return both


def test_sigint_then_resume_equals_an_uninterrupted_run(tmp_path, data, base, capsys):
    three = _three_categories(data, base)
    args = ["run", "--dataset", "synthetic", "--data-path", str(three), *SLOW, "--vis", "whole_norm"]
    # the uninterrupted reference, in this process (no sleeping)
    assert run_cli(capsys, *args, "--out", tmp_path / "ref")[0] == 0
    ref = out_root(tmp_path / "ref", backbone="tiny_slow")

    # the same run in a subprocess, slowed down, interrupted once the first category is finished
    out = tmp_path / "run"
    root = out_root(out, backbone="tiny_slow")
    code = ("import sys, tests.reliability_support; from musc_fast.cli import main; "
            f"sys.exit(main({[*args, '--out', str(out)]!r}))")
    env = {**os.environ, SLEEP_ENV: "0.4", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (root / "results.json").is_file() and "object" in read_json(root / "results.json")["categories"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)  # texture is being scored now (4 batches x 0.4 s)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; finished categories are saved, add --resume to continue" in stderr
    assert (root / "object" / "result.json").is_file()
    assert not (root / "texture" / "result.json").exists() and not (root / "zeta").exists()
    assert list(read_json(root / "results.json")["categories"]) == ["object"]
    assert temp_files(out) == []
    finished = (root / "object" / "result.json").read_bytes()

    code, stdout, _ = run_cli(capsys, *args, "--out", out, "--resume")
    assert code == 0 and "[object] finished by an earlier run with the same settings and inputs: reused" in stdout
    assert (root / "object" / "result.json").read_bytes() == finished  # not scored again
    assert read_json(root / "results.json")["resumed"] == ["object"]
    assert len(_files(ref)) == 1 + 3 + 3 * 8 * 2 and _files(root) == _files(ref)  # every csv and heat map
    assert _numbers(read_json(root / "results.json")) == _numbers(read_json(ref / "results.json"))


def test_resume_scores_again_when_settings_or_inputs_change(tmp_path, data, capsys):
    args = ["run", "--dataset", "synthetic", "--data-path", str(data), "--out", str(tmp_path / "o"), *TINY]
    assert run_cli(capsys, *args)[0] == 0
    code, out, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "reused" in out
    code, out, _ = run_cli(capsys, *args, "--resume", "--r-list", "1", "3")  # other config: other results
    assert code == 0 and "reused" not in out
    img = data / "texture" / "test" / "good" / "000.png"
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)  # same name, new content
    code, out, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "reused" not in out
    code, out, _ = run_cli(capsys, *args, "--resume", "--vis", "whole_norm")  # heat maps were not written
    assert code == 0 and "reused" not in out
    root = out_root(tmp_path / "o")
    (root / "texture" / "result.json").write_text("{ truncated")  # unreadable marker: score again
    code, out, _ = run_cli(capsys, *args, "--resume", "--vis", "whole_norm")
    assert code == 0 and "reused" not in out


def test_failure_before_writing_keeps_the_earlier_results(tmp_path, data, capsys, monkeypatch):
    args = ["run", "--dataset", "synthetic", "--data-path", str(data), "--out", str(tmp_path / "o"), *TINY]
    assert run_cli(capsys, *args)[0] == 0
    root = out_root(tmp_path / "o")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    from musc_fast import runner

    def boom(*a, **k):
        raise RuntimeError("scoring crashed")

    monkeypatch.setattr(runner, "score_category", boom)
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "FAILED texture: scoring crashed" in err
    assert all(p.read_bytes() == b for p, b in before.items() if p.name != "results.json" and p.name != "results.csv")
    assert (root / "texture" / "result.json").is_file()  # still marks the earlier, complete files


# ------------------------------------------------------------------------------------------------
# disk full

def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["write", "replace", "fsync"])
def test_every_writer_turns_enospc_into_one_output_error(tmp_path, monkeypatch, target):
    (tmp_path / "x.json").write_text("old")
    writers = {
        "x.json": lambda p: outputs.write_json(p, {"a": 1}),
        "x.csv": lambda p: outputs.write_csv(p, ["a"], [[1]]),
        "x.png": lambda p: outputs.write_png(p, Image.new("RGB", (4, 4))),
        "x.xlsx": lambda p: outputs.write_xlsx(p, {"c": {"auroc_sp": 1.0}}, {"auroc_sp": 1.0}),
    }
    monkeypatch.setattr(os, target, _enospc)
    for name, write in writers.items():
        with pytest.raises(outputs.OutputError) as info:
            write(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: cannot write (No space left on device)"
    monkeypatch.undo()
    assert (tmp_path / "x.json").read_text() == "old"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary files left


def test_disk_full_during_a_run_is_one_line_and_keeps_old_results(tmp_path, data, capsys, monkeypatch):
    args = ["run", "--dataset", "synthetic", "--data-path", str(data), "--out", str(tmp_path / "o"), *TINY]
    assert run_cli(capsys, *args)[0] == 0
    root = out_root(tmp_path / "o")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "result.json"}
    monkeypatch.setattr(os, "write", _enospc)
    code, _, err = run_cli(capsys, *args)
    monkeypatch.undo()
    assert code == 1 and err.strip() == \
        f"musc-fast: error: {root / 'texture' / 'scores.csv'}: cannot write (No space left on device)"
    assert all(p.read_bytes() == b for p, b in before.items())
    assert temp_files(tmp_path / "o") == []


def test_bank_save_on_a_full_disk(tmp_path, monkeypatch):
    import safetensors.torch

    from musc_fast.bank import Bank
    from tests.production_support import fake_config, random_layers

    bank = Bank.from_features(random_layers(5, 16, (12, 10), seed=1), config=fake_config(image_size=32))
    path = tmp_path / "b.safetensors"
    bank.save(path)
    good = path.read_bytes()
    real = safetensors.torch.save_file

    def short_write(tensors, filename, metadata=None):  # what a full disk did to save_file: no error, short file
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)

    monkeypatch.setattr(safetensors.torch, "save_file", short_write)
    with pytest.raises(outputs.OutputError, match="incomplete file.*disk full"):
        bank.save(path)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(outputs.OutputError, match="No space left on device"):
        bank.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]


def test_bank_cli_on_a_full_disk_is_exit_1(tmp_path, data, capsys, monkeypatch):
    images = data / "texture" / "test" / "good"
    args = ["bank", "build", images, "--out", tmp_path / "b.safetensors", "--backbone", "tiny_test", "--pretrained",
            "none", "--image-size", "64", "--layers", "0", "2", "--device", "cpu"]
    monkeypatch.setattr(os, "replace", _enospc)
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and err.strip() == \
        f"error: {tmp_path / 'b.safetensors'}: cannot write (No space left on device)"
    monkeypatch.undo()
    assert run_cli(capsys, *args)[0] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "data"]
