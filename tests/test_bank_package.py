"""The bank package's public calibration flag and the atomic writer it saves through (issue 12, item 6)."""
from __future__ import annotations

import os
import stat

import pytest

from musc_fast import outputs
from musc_fast.bank import Bank
from tests.production_support import fake_config, random_layers


def _bank(n: int = 5, seed: int = 3) -> Bank:
    return Bank.from_features(random_layers(n, 16, (12, 10), seed=seed), config=fake_config(image_size=32))


def test_has_calibration_follows_the_leave_one_out_scores(tmp_path):
    bank = _bank()
    assert not bank.has_calibration
    bank.leave_one_out()
    assert bank.has_calibration
    path = bank.save(tmp_path / "b.safetensors")
    assert Bank.load(path).has_calibration  # stored in the file
    assert not Bank.load(path).with_config(r_list=(1,)).has_calibration  # other scoring options
    assert bank.with_config(device="cpu").has_calibration  # a field that does not change the scores
    bank.add_features(random_layers(1, 16, (12, 10), seed=9))
    assert not bank.has_calibration  # new contents: every leave-one-out score changes
    uncalibrated = bank.save(tmp_path / "c.safetensors")
    assert not Bank.load(uncalibrated).has_calibration


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_file_atomic_gives_the_umask_mode_and_replaces_whole(tmp_path, umask):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"new")
        os.chmod(tmp, 0o600)  # what safetensors' save_file does

    old = os.umask(umask)
    try:
        outputs.write_file_atomic(path, write)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_write_file_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def half_then_fail(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(outputs.OutputError) as info:
        outputs.write_file_atomic(path, half_then_fail)
    assert str(info.value) == f"{path}: cannot write (No space left on device)"
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]

    def crash(tmp):
        tmp.write_bytes(b"n")
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):  # not an OSError: passes through, the temporary file still goes
        outputs.write_file_atomic(path, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
