"""Reference bank: scoring x against the other N-1 images equals x's row of the batch scores (random
tokens and a tiny backbone, float64 reference and torch path, before and after save/load); file
checks; FIFO; chunking; RsCIN over bank + new; thresholds; the CLI pieces."""
from __future__ import annotations

import argparse
import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from musc_fast import MuSc, score_features
from musc_fast.bank import Bank, BankError, feature_hash
from musc_fast.cli_bank import add_bank_commands, run_bank_command
from musc_fast.memory import plan_bank
from musc_fast.ops import rscin
from musc_fast.ops.reference import lnamd_reference, mutual_scores_reference
from musc_fast.threshold import Threshold, as_threshold
from tests.production_support import FakeBackbone, fake_config, fake_images, random_layers, register_fake

ATOL_FP32 = 1e-5  # fp32 similarities vs float64 (as in test_msm)
ATOL_BLOCKS = 1e-6  # the same fp32 math in differently shaped matmul blocks
# Backbone outputs of differently composed batches differ in the last bits too, and d = sqrt(2 - 2s)
# amplifies a similarity error by 1/d for close patches (the fake images are near-duplicates).
ATOL_BACKBONE = 1e-5


def _config(**kw):
    return fake_config(**{"image_size": 28, **kw})


def _reference_patch(layers, r_list, x):
    """Float64 oracle: x's row of the batch MSM, mean over layers and r."""
    rows = [mutual_scores_reference(lnamd_reference(t.numpy(), r))[x] for t in layers for r in r_list]
    return np.mean(rows, axis=0)


@pytest.fixture(scope="module")
def tokens():
    return random_layers(7, 49, (16, 12), seed=3)


@pytest.fixture(scope="module")
def batch(tokens):
    return score_features(tokens, None, image_size=28, r_list=(1, 3))


@pytest.mark.parametrize("x", [0, 3, 6])
def test_bank_row_equals_batch_row(tokens, batch, x, tmp_path):
    keep = [i for i in range(7) if i != x]
    bank = Bank.from_features([t[keep] for t in tokens], config=_config())
    res = bank.score_features([t[x:x + 1] for t in tokens])
    assert res.patch_scores.shape == (1, 7, 7) and res.patch_scores.dtype == np.float64
    np.testing.assert_allclose(res.patch_scores[0], batch.patch_scores[x], rtol=0, atol=ATOL_BLOCKS)
    np.testing.assert_allclose(res.patch_scores[0].ravel(), _reference_patch(tokens, (1, 3), x),
                               rtol=0, atol=ATOL_FP32)
    np.testing.assert_allclose(res.anomaly_maps[0], batch.anomaly_maps[x], rtol=0, atol=ATOL_BLOCKS)
    np.testing.assert_array_equal(res.image_scores, res.raw_image_scores)  # RsCIN is off by default
    # after save/load the stored tokens are bit-identical, so the scores are too
    loaded = Bank.load(bank.save(tmp_path / "b.safetensors"))
    again = loaded.score_features([t[x:x + 1] for t in tokens])
    np.testing.assert_array_equal(again.patch_scores, res.patch_scores)


def test_bank_at_musc_level_with_backbone(tmp_path):
    images = fake_images(6, seed=5)
    model = MuSc(_config(image_size=32, rscin_k=(0,)), backbone=FakeBackbone())
    batch = model.score(images, progress=False)
    for x in (1, 4):
        others = torch.cat([images[:x], images[x + 1:]])
        bank = Bank.build(others, model=model, progress=False)
        assert len(bank) == 5 and bank.names[0] == "tensor[0]"
        res = bank.score(images[x:x + 1])
        np.testing.assert_allclose(res.patch_scores[0], batch.patch_scores[x], rtol=0, atol=ATOL_BACKBONE)
        np.testing.assert_allclose(res.raw_image_scores[0], batch.raw_image_scores[x], rtol=0,
                                   atol=ATOL_BACKBONE)
        loaded = Bank.load(bank.save(tmp_path / f"b{x}.safetensors"))
        again = loaded.score(images[x:x + 1], model=model)
        np.testing.assert_array_equal(again.patch_scores, res.patch_scores)


def test_build_chunks_and_max_size():
    images = fake_images(7, seed=2)
    model = MuSc(_config(image_size=32), backbone=FakeBackbone())
    whole = Bank.build(images, model=model, progress=False)
    chunked = Bank.build(images, model=model, chunk=3, progress=False)
    for a, b in zip(whole.tokens, chunked.tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    last = Bank.build(images, model=model, max_size=4, progress=False)
    assert len(last) == 4 and last.names == [f"tensor[{i}]" for i in range(3, 7)]
    torch.testing.assert_close(last.tokens[0], whole.tokens[0][3:], rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::musc_fast.ops.SmallBatchWarning")  # a 4-image bank
def test_fifo_add_and_cache_invalidation(tokens):
    bank = Bank.from_features([t[:4] for t in tokens], config=_config(), names=list("abcd"), max_size=5)
    loo_before = bank.leave_one_out().patch_scores
    evicted = bank.add_features([t[4:7] for t in tokens], names=list("efg"))
    assert evicted == ["a", "b"] and bank.names == list("cdefg") and len(bank) == 5
    torch.testing.assert_close(bank.tokens[1], tokens[1][2:7], rtol=0, atol=0)
    assert bank.leave_one_out().patch_scores.shape[0] == 5 != loo_before.shape[0]
    with pytest.raises(BankError, match="do not match"):
        bank.add_features([t[:1, :25] for t in tokens])


def test_chunked_bank_scoring_matches(monkeypatch):
    tokens = random_layers(10, 49, (16, 12), seed=4)
    bank = Bank.from_features([t[:6] for t in tokens], config=_config())
    query = [t[6:] for t in tokens]
    big = bank.score_features(query)
    assert bank._zcache is not None  # plenty of memory: the bank's Z stay cached between calls
    np.testing.assert_array_equal(bank.score_features(query).patch_scores, big.patch_scores)
    monkeypatch.setenv("MUSC_FAST_MEMORY_BUDGET", "120K")
    plan = plan_bank(4, 6, 49, 16, n_layers=2, n_r=2, device="cpu")
    assert plan.query_block < 4 and plan.bank_chunk < 6 and not plan.cache_z  # really chunked
    fresh = Bank.from_features([t[:6] for t in tokens], config=_config())
    small = fresh.score_features(query)
    assert fresh._zcache is None
    np.testing.assert_allclose(small.patch_scores, big.patch_scores, rtol=0, atol=ATOL_BLOCKS)
    for x in range(6, 10):
        np.testing.assert_allclose(big.patch_scores[x - 6].ravel(),
                                   _bank_reference([t[:6] for t in tokens], [t[x] for t in tokens], (1, 3)),
                                   rtol=0, atol=ATOL_FP32)


def _bank_reference(bank_layers, query_layers, r_list):
    """Float64 oracle of bank scoring: the batch reference over bank + query, row of the query."""
    full = [torch.cat([b, q[None]]) for b, q in zip(bank_layers, query_layers)]
    return _reference_patch(full, r_list, len(bank_layers[0]))


def test_bank_rscin_over_union(tokens):
    cls = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    bank = Bank.from_features([t[:5] for t in tokens], cls[:5], config=_config(rscin_k=(1, 2, 3)))
    res = bank.score_features([t[5:] for t in tokens], cls[5:], rscin=True)
    loo = bank.leave_one_out().raw_image_scores
    expect = rscin(np.concatenate([loo, res.raw_image_scores]), cls, (1, 2, 3))[5:]
    np.testing.assert_allclose(res.image_scores, expect, rtol=0, atol=1e-12)
    assert not np.allclose(res.image_scores, res.raw_image_scores)
    with pytest.raises(BankError, match="raw score scale"):
        bank.score_features([t[5:] for t in tokens], cls[5:], rscin=True, threshold=Threshold.from_bank(bank))


def test_leave_one_out_is_batch_scoring_and_is_saved(tokens, batch, tmp_path):
    bank = Bank.from_features(tokens, config=_config())
    loo = bank.leave_one_out()
    np.testing.assert_array_equal(loo.patch_scores, batch.patch_scores)
    path = bank.save(tmp_path / "b.safetensors")
    loaded = Bank.load(path)
    assert loaded._loo is not None
    np.testing.assert_array_equal(loaded.leave_one_out().raw_image_scores, loo.raw_image_scores)
    assert Bank.load(path).with_config(r_list=(1,))._loo_key() != loaded._loo_key()  # options change it


def test_thresholds(tokens):
    bank = Bank.from_features([t[:6] for t in tokens], config=_config())
    loo = bank.leave_one_out()
    top = Threshold.from_bank(bank, 1.0)
    assert top.image == loo.raw_image_scores.max() and top.pixel == top.image and top.calibrated
    assert not top.apply(loo).labels.any()  # q = 1: every bank image is OK (score > threshold is NG)
    mid = Threshold.from_bank(bank, 0.5, pixel_quantile=0.9)
    assert mid.image == pytest.approx(np.quantile(loo.raw_image_scores, 0.5))
    assert mid.pixel == pytest.approx(np.quantile(loo.anomaly_maps, 0.9))
    res = bank.score_features([t[6:] for t in tokens], threshold=0.0)
    assert res.labels.tolist() == [True] and res.masks.shape == (1, 28, 28)
    # pixel threshold = image threshold: the mask is non-empty exactly for NG images
    res = Threshold.fixed(float(np.median(loo.raw_image_scores))).apply(loo)
    np.testing.assert_array_equal(res.masks.any(axis=(1, 2)), res.labels)
    assert 0 < res.labels.sum() < 6
    with pytest.raises(ValueError, match="quantile"):
        Threshold.from_bank(bank, 1.5)
    with pytest.raises(TypeError):
        as_threshold("0.3")


def _write_bank_file(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)


def test_load_errors_are_one_line(tokens, tmp_path):
    bank = Bank.from_features(tokens, config=_config())
    path = bank.save(tmp_path / "b.safetensors")
    raw = bytearray(path.read_bytes())

    def check(p, pattern, **kw):
        with pytest.raises(BankError, match=pattern) as err:
            Bank.load(p, **kw)
        assert "\n" not in str(err.value)

    check(tmp_path / "missing.safetensors", "no such bank file")
    flipped = tmp_path / "flipped.safetensors"
    raw2 = raw.copy()
    raw2[-5] ^= 0xFF  # a byte of tensor data
    flipped.write_bytes(bytes(raw2))
    check(flipped, "checksum mismatch")
    Bank.load(flipped, verify=False)  # the structure is intact; only the checksum notices
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(raw[:len(raw) // 2]))
    check(truncated, "not a readable bank file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a bank")
    check(garbage, "not a readable bank file")
    check(path, "other features", config=_config(image_size=56))
    check(path, "other features", config=_config(layers=(0, 2)))
    assert len(Bank.load(path, config=_config(r_list=(1,)))) == 7  # scoring options may change

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, edit, pattern in [
        ("newer", {"format_version": "99"}, "newer than this musc_fast"),
        ("foreign", {"format": "something"}, "not a musc_fast bank"),
        ("edited", {"config": json.dumps({**json.loads(meta["config"]), "image_size": 56})},
         "config hash mismatch"),
        ("badjson", {"names": "[unterminated"}, "corrupt bank metadata"),
        ("names", {"names": json.dumps(list(reversed(json.loads(meta["names"]))))}, "metadata checksum mismatch"),
        ("maxsize", {"max_size": "3"}, "metadata checksum mismatch"),
        ("hashes", {"hashes": json.dumps(["0" * 64] * 7)}, "metadata checksum mismatch"),
    ]:
        p = tmp_path / f"{name}.safetensors"
        _write_bank_file(p, tensors, {**meta, **edit})
        check(p, pattern)


def test_feature_hash_ignores_scoring_options():
    a = _config()
    assert feature_hash(a) == feature_hash(_config(r_list=(1, 3, 5), topmin=(0, 0.5), aligned_window=2))
    assert feature_hash(a) != feature_hash(_config(image_size=56))
    with pytest.raises(BankError, match="cannot change image_size"):
        Bank.from_features([torch.randn(3, 49, 4)] * 2, config=a).with_config(image_size=56)


# --- CLI pieces ---------------------------------------------------------------------------------------
def _parser():
    parser = argparse.ArgumentParser(prog="musc-fast")
    add_bank_commands(parser.add_subparsers(dest="command"))
    return parser


def _run(argv, capsys):
    rc = run_bank_command(_parser().parse_args(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_build_info_score(tmp_path, capsys):
    register_fake()
    folder = tmp_path / "good"
    folder.mkdir()
    pixels = (fake_images(7, seed=9).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i in range(6):
        Image.fromarray(pixels[i]).save(folder / f"{i:03d}.png")
    new = tmp_path / "new.png"
    Image.fromarray(pixels[6]).save(new)
    bank_path = tmp_path / "line.safetensors"
    common = ["--backbone", "_fake_test", "--pretrained", "none", "--image-size", "32", "--layers", "0", "1",
              "--r-list", "1", "3", "--device", "cpu", "--batch-size", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-N interval warning of the 5-image leave-one-out
        rc, out, _ = _run(["bank", "build", "--out", str(bank_path), str(folder), "--max-size", "5",
                           "--calibrate", *common], capsys)
    assert rc == 0 and bank_path.exists() and "5 images" in out
    rc, out, _ = _run(["bank", "info", str(bank_path)], capsys)
    assert rc == 0 and "leave-one-out scores stored: yes" in out and "001.png" in out
    out_dir = tmp_path / "out"
    rc, out, err = _run(["score", "--bank", str(bank_path), "--threshold-quantile", "1.0",
                         "--out", str(out_dir), str(new), str(folder / "000.png")], capsys)
    assert rc == 0, err
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert [row[0] for row in lines] == [str(new), str(folder / "000.png")]
    assert all(row[2] in ("OK", "NG") for row in lines) and "threshold: image" in err
    with open(out_dir / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == [row[2] for row in lines]
    assert float(rows[0]["image_score"]) == pytest.approx(float(lines[0][1]), abs=1e-6)
    heat = Image.open(out_dir / "heatmaps" / "0000_new.png")
    assert heat.size == (32, 32) and heat.mode == "RGB"
    assert Image.open(out_dir / "masks" / "0001_000.png").mode == "L"
    # the CLI's scores are the library's
    bank = Bank.load(bank_path)
    lib = bank.score([str(new)])
    assert float(lines[0][1]) == pytest.approx(lib.image_scores[0], abs=1e-6)


def test_cli_errors_exit_2(tmp_path, capsys):
    rc, _, err = _run(["score", "--bank", str(tmp_path / "none.safetensors"), "x.png"], capsys)
    assert rc == 2 and err.startswith("error:") and "no such bank file" in err and err.count("\n") == 1
    rc, _, err = _run(["bank", "build", "--out", str(tmp_path / "b.safetensors"), str(tmp_path / "nothing"),
                       "--backbone", "_fake_test"], capsys)
    assert rc == 2 and "no such image file or folder" in err
    tokens = random_layers(4, 16, (12, 10), seed=0)
    path = Bank.from_features(tokens, config=fake_config()).save(tmp_path / "b.safetensors")
    rc, _, err = _run(["score", "--bank", str(path), "--pixel-threshold", "0.2", "x.png"], capsys)
    assert rc == 2 and "need --threshold" in err
    with pytest.raises(SystemExit):  # argparse: both thresholds at once
        _parser().parse_args(["score", "--bank", str(path), "--threshold", "1", "--threshold-quantile", "0.5",
                              "x.png"])


def test_version_1_file_loads_with_a_warning(tokens, tmp_path):
    from safetensors import safe_open

    bank = Bank.from_features(tokens, config=_config(), names=[f"n{i}" for i in range(7)])
    path = bank.save(tmp_path / "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    v1 = {k: v for k, v in meta.items() if k not in ("meta_checksum", "hashes")}
    old = tmp_path / "v1.safetensors"
    _write_bank_file(old, tensors, {**v1, "format_version": "1"})
    with pytest.warns(RuntimeWarning, match="format version 1.*save it again"):
        bank = Bank.load(old)
    assert bank.names == [f"n{i}" for i in range(7)] and bank.hashes == [None] * 7
    upgraded = bank.save(tmp_path / "v2.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Bank.load(upgraded).names == bank.names


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bank_file_mode_honours_umask(tokens, tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        path = Bank.from_features(tokens, config=_config()).save(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_add_skips_duplicates_by_content_and_name(tmp_path):
    register_fake()
    pixels = (fake_images(5, seed=4).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels[i]).save(paths[-1])
    copy = tmp_path / "copy_of_0.png"
    copy.write_bytes(paths[0].read_bytes())
    bank = Bank.build([str(p) for p in paths[:3]], fake_config(), progress=False)
    assert all(h is not None for h in bank.hashes)
    bank.leave_one_out()
    assert bank.duplicates([str(paths[3]), str(copy), str(paths[3])]) == {1: str(paths[0]), 2: str(paths[3])}
    with pytest.warns(RuntimeWarning, match="skipped 2 image.*already in the bank"):
        bank.add([str(paths[3]), str(copy), str(paths[1])])
    assert bank.names == [str(p) for p in paths[:4]] and len(bank) == 4
    assert bank._loo is None  # the old calibration no longer describes the bank: recomputed on demand
    assert len(bank.leave_one_out().raw_image_scores) == 4
    # tensors and PIL images are hashed by their pixels
    pil = Image.fromarray(pixels[4])
    bank.add([pil])
    assert bank.duplicates([Image.fromarray(pixels[4].copy())]) == {0: "image[0]"}
    # a bank without hashes (from_features, version-1 files) matches by name
    plain = Bank.from_features(bank.tokens, bank.cls, config=bank.config, names=bank.names)
    assert plain.duplicates([str(paths[2]), str(copy)]) == {0: str(paths[2])}


def test_score_skip_and_on_chunk(tmp_path):
    register_fake()
    pixels = (fake_images(6, seed=5).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pixels[i]).save(paths[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    bank = Bank.build(paths[:3], fake_config(), progress=False)
    items = [paths[3], str(bad), paths[4], paths[5]]
    seen = []
    res = bank.score(items, on_error="skip", chunk=2, on_chunk=lambda r, idx: seen.append((idx, r.image_scores)))
    assert list(res.skipped) == [1] and "bad.png" in res.skipped[1] and len(res) == 3
    assert [idx for idx, _ in seen] == [[0], [2, 3]]
    np.testing.assert_array_equal(np.concatenate([s for _, s in seen]), res.image_scores)
    whole = bank.score([paths[3], paths[4], paths[5]])
    np.testing.assert_allclose(res.image_scores, whole.image_scores, rtol=0, atol=ATOL_BLOCKS)
    from musc_fast.data import UnreadableImageError

    with pytest.raises(UnreadableImageError, match="bad.png"):
        bank.score(items)
