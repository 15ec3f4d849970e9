"""Outputs: file modes under the umask, and Ctrl-C at a category boundary (issue 10, items 9 and 15)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from musc_fast import outputs
from tests.reliability_support import TINY, out_root, read_json, run_cli, synthetic_copy, temp_files

REPO = Path(__file__).resolve().parents[1]


def test_output_files_honour_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        outputs.write_json(tmp_path / "a.json", {"a": 1})
        outputs.write_png(tmp_path / "a.png", Image.new("RGB", (4, 4)))
        data = synthetic_copy(tmp_path / "data", tmp_path / "base")
        assert run_cli(capsys, "run", "--dataset", "synthetic", "--data-path", data, "--out", tmp_path / "o",
                       *TINY, "--vis", "whole_norm")[0] == 0
        os.umask(0o077)
        outputs.write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    files = [tmp_path / "a.json", tmp_path / "a.png", *(p for p in (tmp_path / "o").rglob("*") if p.is_file())]
    assert len(files) > 10
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert oct((tmp_path / "private.json").stat().st_mode & 0o777) == "0o600"


# A SIGINT that lands in an at-fork callback (as in logging's _releaseLock when the next category's
# DataLoader forks its workers) was swallowed: "Exception ignored in ...", the run went on, exit 0.
# The subprocess registers such a callback that announces itself on stderr and sleeps at the first fork
# after the first category is finished; the test interrupts it there (no timing guesswork).
_CHILD = """
import os, sys, time
from pathlib import Path
import tests.reliability_support
from musc_fast.cli import main
marker = Path({marker!r})
fired = []
def at_fork():
    if marker.is_file() and not fired:
        fired.append(1)
        print("BOUNDARY-FORK", file=sys.stderr, flush=True)
        time.sleep(30)
os.register_at_fork(after_in_parent=at_fork)
sys.exit(main({args!r}))
"""


def test_sigint_in_an_at_fork_callback_stops_the_run_and_resume_completes(tmp_path, capsys):
    data = synthetic_copy(tmp_path / "data", tmp_path / "base", categories=("object", "texture"))
    out = tmp_path / "o"
    root = out_root(out)
    args = ["run", "--dataset", "synthetic", "--data-path", str(data), "--out", str(out),
            *[a if a != "0" or i == 0 else a for i, a in enumerate(TINY)]]
    args[args.index("--num-workers") + 1] = "1"  # workers are forked per category
    code = _CHILD.format(marker=str(root / "object" / "result.json"), args=args)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "BOUNDARY-FORK" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        assert "BOUNDARY-FORK" in line, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; finished categories are saved" in stderr
    assert (root / "object" / "result.json").is_file() and not (root / "texture" / "result.json").exists()
    assert temp_files(out) == []
    code, stdout, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "[object] finished by an earlier run" in stdout
    assert list(read_json(root / "results.json")["categories"]) == ["object", "texture"]


# ------------------------------------------------------------------------------------------------
# two runs into one --out (item 8)

def test_two_runs_into_one_out_keep_both_categories(tmp_path, capsys):
    data = synthetic_copy(tmp_path / "data", tmp_path / "base", categories=("object", "texture"))
    args = ["run", "--dataset", "synthetic", "--data-path", str(data), "--out", str(tmp_path / "o"), *TINY]
    assert run_cli(capsys, *args, "--category", "object")[0] == 0
    assert run_cli(capsys, *args, "--category", "texture")[0] == 0
    root = out_root(tmp_path / "o")
    first = read_json(root / "results.json")["categories"]
    assert list(first) == ["object", "texture"]
    csv_rows = [line.split(",")[0] for line in (root / "results.csv").read_text().splitlines()]
    assert csv_rows == ["category", "object", "texture", "mean"]
    assert run_cli(capsys, *args, "--category", "object", "--r-list", "1")[0] == 0  # a rerun replaces its row
    again = read_json(root / "results.json")["categories"]
    assert list(again) == ["object", "texture"] and again["texture"] == first["texture"]
    doc = read_json(root / "object" / "result.json")  # the scores.csv columns say what they compare with
    assert doc["category"] == "object" and "within the batch" in doc["scores_columns"]["score"]
    assert "bank" in doc["scores_columns"]["score"]


def test_a_concurrent_writer_waits_then_is_refused_with_one_line(tmp_path):
    import pytest

    with outputs.results_lock(tmp_path):
        with pytest.raises(outputs.OutputError, match="another musc-fast run has been writing results here"):
            with outputs.results_lock(tmp_path, timeout_s=0.2):
                pass
    with outputs.results_lock(tmp_path, timeout_s=0.2):  # free again
        pass


def test_concurrent_runs_into_one_out_keep_every_category(tmp_path):
    data = synthetic_copy(tmp_path / "data", tmp_path / "base", categories=("object", "texture"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for cat in ("object", "texture"):
        args = ["run", "--dataset", "synthetic", "--data-path", str(data), "--out", str(tmp_path / "o"), *TINY,
                "--category", cat]
        code = f"import sys, tests.reliability_support; from musc_fast.cli import main; sys.exit(main({args!r}))"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert sorted(read_json(out_root(tmp_path / "o") / "results.json")["categories"]) == ["object", "texture"]


# ------------------------------------------------------------------------------------------------
# batched syncs stay atomic (item 16)

def test_a_batch_that_fails_to_sync_leaves_old_files_and_no_temporaries(tmp_path, monkeypatch):
    import errno

    import pytest

    (tmp_path / "a.png").write_bytes(b"old")

    def enospc(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(outputs.OutputError, match="No space left on device"):
        with outputs.AtomicBatch() as batch:
            batch.add(tmp_path / "a.png", b"new")
            batch.add(tmp_path / "sub" / "b.png", b"new")
    monkeypatch.undo()
    assert (tmp_path / "a.png").read_bytes() == b"old" and not (tmp_path / "sub" / "b.png").exists()
    assert temp_files(tmp_path) == []
    with outputs.AtomicBatch() as batch:
        batch.add(tmp_path / "a.png", b"new")
    assert (tmp_path / "a.png").read_bytes() == b"new" and temp_files(tmp_path) == []


def test_bank_files_honour_the_umask(tmp_path):
    from musc_fast.bank import Bank
    from tests.production_support import fake_config, random_layers

    old = os.umask(0o022)
    try:
        Bank.from_features(random_layers(3, 16, (12, 10), seed=1), config=fake_config(image_size=32)).save(
            tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert oct((tmp_path / "b.safetensors").stat().st_mode & 0o777) == "0o644"
