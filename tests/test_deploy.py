"""Exported banks (musc_fast.export) run by the torch-free Inferencer (musc_fast.deploy) reproduce
``Bank.score``; the preprocessing equals the loader's; bad model folders and images are one line.

Data: bottle ``train/good`` (10 images) as the bank, its defect and good test images as queries; the
magnetic-tile set (``train/good`` bank, test images with masks) for labels and masks. 128 px keeps it
fast (offline preset, EfficientNet-Lite0).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from musc_fast.backbones.base import BackboneOutput
from musc_fast.bank import Bank
from musc_fast.cli import main
from musc_fast.config import MuScConfig
from musc_fast.deploy import ImageInputError, Inferencer, ModelFolderError
from musc_fast.deploy.manifest import MANIFEST, meta_checksum
from musc_fast.export import BankGraph, ExportError, export_bank
from musc_fast.export.writer import build_graph
from musc_fast.ops import lnamd_multi
from musc_fast.ops.interval import interval_bounds
from musc_fast.threshold import Threshold
from tests.conftest import REPO, shared_path

SIZE = 128
# fp32: the graph computes distances in float32 where Bank.score uses float64, and the runtimes' backbone
# kernels differ in the last bits from torch's: measured max |delta| 6e-7 on scores, 3e-6 on maps.
ATOL_FP32 = 1e-4
# fp16 (weights and bank features stored in float16, computed in float32): measured 6e-4 on scores and
# 1.5e-3 on maps on bottle; d = sqrt(2 - 2s) amplifies the rounding of close patches.
ATOL_FP16_SCORE, ATOL_FP16_MAP = 3e-3, 6e-3


def _have(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


needs_ort = pytest.mark.skipif(not _have("onnxruntime"), reason="onnxruntime is not installed")
needs_ov = pytest.mark.skipif(not _have("openvino"), reason="openvino is not installed")


def _images(*parts: str, every: int = 1) -> list[str]:
    return sorted(str(p) for p in shared_path(*parts).rglob("*.png"))[::every]


@pytest.fixture(scope="module")
def bottle_bank():
    cfg = MuScConfig.preset("offline", image_size=SIZE, device="cpu")
    return Bank.build(_images("datasets", "mvtec_bottle", "bottle", "train", "good"), cfg, progress=False)


@pytest.fixture(scope="module")
def bottle_queries():
    return _images("datasets", "mvtec_bottle", "bottle", "test", every=2)  # defects and good, 42 images


@pytest.fixture(scope="module")
def bottle_ref(bottle_bank, bottle_queries):
    return bottle_bank.score(bottle_queries)


@pytest.fixture(scope="module")
def exported(bottle_bank, tmp_path_factory):
    """(format, precision) -> model folder, exported once per module."""
    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    def get(fmt: str, precision: str = "fp32") -> Path:
        if (fmt, precision) not in cache:
            cache[fmt, precision] = export_bank(bottle_bank, root / f"{fmt}_{precision}", fmt=fmt, precision=precision)
        return cache[fmt, precision]
    return get


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


# --- the graph's arithmetic on random tokens (no backbone, no export) -----------------------------------
class _PatchTokens(torch.nn.Module):
    """A stand-in backbone: layer 0 = the image's 4x4 patches as tokens (C = 48), layer 1 = a fixed random
    projection of them (C = 7, not a power of two)."""

    preprocess = None

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 7, generator=torch.Generator().manual_seed(1)))

    def forward(self, images, need_cls=True):
        t = torch.nn.functional.pixel_unshuffle(images, 4).flatten(2).transpose(1, 2)  # [B, L, 48]
        return BackboneOutput(tokens=[t, t @ self.proj], cls=None)


@pytest.mark.parametrize("m,window", [(2, None), (3, 1), (5, None), (4, 0)])
def test_graph_equals_bank_score_features_on_random_tokens(m, window):
    """BankGraph (torch, the module the export traces) against Bank.score_features: fresh random banks
    of M = 2..5 images incl. a duplicated bank image (ties), windows on and off, G = 5 (L = 25)."""
    torch.manual_seed(m)
    backbone = _PatchTokens()
    bank_px = torch.rand(m, 3, 20, 20)
    bank_px[-1] = bank_px[0]  # a duplicate: tied nearest distances
    query_px = torch.rand(3, 3, 20, 20)
    cfg = MuScConfig.preset("offline", image_size=20, layers=(0, 1), r_list=(1, 3), device="cpu",
                            aligned_window=window)
    bank = Bank.from_features(backbone(bank_px).tokens, config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SmallBatchWarning for M = 2, 3: one image is averaged
        ref = bank.score_features(backbone(query_px).tokens)
        k_min, k_max = interval_bounds(m, cfg.topmin)
    zs = [lnamd_multi(t, list(cfg.r_list)) for t in bank.tokens]
    graph = BankGraph(backbone, zs, cfg.r_list, k_min, k_max, 20, window=window)
    with torch.no_grad():
        score, maps = graph(query_px)
    assert np.abs(score.numpy() - ref.image_scores).max() < 1e-5
    assert np.abs(maps.numpy() - ref.anomaly_maps).max() < 1e-5


def test_graph_refuses_an_empty_interval():
    z = [[torch.nn.functional.normalize(torch.randn(3, 16, 4), dim=-1)]]
    with pytest.raises(ValueError, match="empty interval"):
        BankGraph(_PatchTokens(), z, (1,), 2, 2, 16)


# --- preprocessing ---------------------------------------------------------------------------------------
def _odd_images(tmp_path: Path) -> list[str]:
    """Files in the modes a camera or a user may hand over, each as the loader would convert it."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = []
    for mode, img in {
        "RGBA": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (37, 53), dtype=np.uint8)]), "RGBA"),
        "L": Image.fromarray(rgb[..., 0]),
        "LA": Image.fromarray(rgb).convert("LA"),
        "P": Image.fromarray(rgb).convert("P"),
        "I16": Image.fromarray(rng.integers(0, 65536, (37, 53)).astype(np.uint16)),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }.items():
        p = tmp_path / f"{mode}.{'tiff' if mode == 'CMYK' else 'png'}"
        img.save(p)
        out.append(str(p))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated by 90 degrees: the loader turns it upright
    p = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(p, exif=exif.tobytes())
    out.append(str(p))
    return out


@needs_ort
def test_preprocessing_equals_the_loader_exactly(bottle_bank, exported, tmp_path):
    inf = Inferencer(exported("onnx"))
    files = (_images("datasets", "mvtec_bottle", "bottle", "test", every=20)
             + _images("datasets", "mtd", "magnetic_tile", "test", "crack", every=20)  # grayscale L files
             + _odd_images(tmp_path))
    ref = bottle_bank.model().preprocess(files, progress=False).numpy()
    got = np.stack([inf.preprocess(f) for f in files])
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got, ref)  # bit for bit, not within a tolerance
    # arrays and PIL images take the same path as files
    arr = np.asarray(Image.open(files[0]))
    assert np.array_equal(inf.preprocess(arr), ref[0])
    assert np.array_equal(inf.preprocess(Image.open(files[-1])), ref[-1])


@needs_ort
def test_nan_float_image_is_refused_like_the_loader(exported, tmp_path, capsys):
    p = tmp_path / "nan.tiff"
    a = np.zeros((20, 20), dtype=np.float32)
    a[3, 4] = np.nan
    Image.fromarray(a, "F").save(p)
    with pytest.raises(ImageInputError, match="NaN"):
        Inferencer(exported("onnx")).predict(str(p))
    assert main(["predict", "--model", str(exported("onnx")), str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan.tiff" in err[0] and "NaN" in err[0]


# --- parity with Bank.score -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,runtime", [
    pytest.param("onnx", "onnxruntime", marks=needs_ort),
    pytest.param("onnx", "openvino", marks=needs_ov),
    pytest.param("openvino", "openvino", marks=needs_ov),
])
def test_fp32_reproduces_bank_score_on_bottle(fmt, runtime, exported, bottle_ref, bottle_queries):
    inf = Inferencer(exported(fmt), runtime=runtime)
    p = inf.predict(bottle_queries)
    assert p.score.shape == (len(bottle_queries),) and p.anomaly_map.shape == (len(bottle_queries), SIZE, SIZE)
    assert np.abs(p.score - bottle_ref.image_scores).max() < ATOL_FP32
    assert np.abs(p.anomaly_map - bottle_ref.anomaly_maps).max() < ATOL_FP32
    # the same OK/NG labels as the bank with its calibrated threshold
    ref_labels = bottle_ref.image_scores > inf.image_threshold
    assert np.array_equal(p.label, ref_labels)
    assert p.label.any() and not p.label.all()  # the threshold separates something
    one = inf.predict(bottle_queries[0])  # one image: scalars and [S, S]
    assert isinstance(one.score, float) and one.anomaly_map.shape == (SIZE, SIZE)
    assert abs(one.score - p.score[0]) < 1e-5


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_ort), pytest.param("openvino", marks=needs_ov)])
def test_fp16_within_its_tolerance(fmt, exported, bottle_ref, bottle_queries):
    p = Inferencer(exported(fmt, "fp16")).predict(bottle_queries)
    assert np.abs(p.score - bottle_ref.image_scores).max() < ATOL_FP16_SCORE
    assert np.abs(p.anomaly_map - bottle_ref.anomaly_maps).max() < ATOL_FP16_MAP
    size16 = sum((exported(fmt, "fp16") / f).stat().st_size for f in json.loads(
        (exported(fmt, "fp16") / MANIFEST).read_text())["files"])
    size32 = sum((exported(fmt) / f).stat().st_size for f in json.loads(
        (exported(fmt) / MANIFEST).read_text())["files"])
    assert size16 < 0.6 * size32
    thr = Inferencer(exported(fmt, "fp16")).image_threshold
    far = np.abs(bottle_ref.image_scores - thr) > ATOL_FP16_SCORE  # labels agree away from the threshold
    assert np.array_equal(p.label[far], (bottle_ref.image_scores > thr)[far])


@needs_ort
@needs_ov
def test_magnetic_tile_labels_and_masks(tmp_path):
    """The magnetic-tile bank (train/good, grayscale files) and defect + good test images: scores, maps,
    labels and masks as Bank.score with the same calibrated thresholds (pixel quantile 0.999)."""
    cfg = MuScConfig.preset("offline", image_size=SIZE, device="cpu")
    bank = Bank.build(_images("datasets", "mtd", "magnetic_tile", "train", "good", every=2), cfg, progress=False)
    queries = _images("datasets", "mtd", "magnetic_tile", "test", every=12)  # 46 images, all defect types
    thr = Threshold.from_bank(bank, 0.99, pixel_quantile=0.999)
    ref = bank.score(queries, threshold=thr)
    for fmt in ("onnx", "openvino"):
        folder = export_bank(bank, tmp_path / fmt, fmt=fmt, quantile=0.99, pixel_quantile=0.999)
        inf = Inferencer(folder)
        assert inf.image_threshold == thr.image and inf.pixel_threshold == thr.pixel
        p = inf.predict(queries)
        assert np.abs(p.score - ref.image_scores).max() < ATOL_FP32
        assert np.abs(p.anomaly_map - ref.anomaly_maps).max() < ATOL_FP32
        assert np.array_equal(p.label, ref.labels)
        clear = np.abs(ref.anomaly_maps - thr.pixel) > ATOL_FP32  # pixels not at the threshold itself
        assert np.array_equal(p.mask[clear], ref.masks[clear])
        assert ref.masks.any()


@needs_ort
def test_normalization_puts_the_threshold_at_one_half(exported, bottle_queries):
    raw = Inferencer(exported("onnx"))
    norm = Inferencer(exported("onnx"), normalize=True)
    a, b = raw.predict(bottle_queries), norm.predict(bottle_queries)
    assert np.array_equal(a.label, b.label) and np.array_equal(a.mask, b.mask)  # decided on raw values
    assert b.score.min() >= 0 and b.score.max() <= 1
    assert np.array_equal(b.score > 0.5, a.label)
    n = raw.meta["normalization"]
    expect = np.clip((a.score - raw.image_threshold) / (n["image_max"] - n["image_min"]) + 0.5, 0, 1)
    assert np.allclose(b.score, expect, atol=1e-6)
    assert np.allclose(b.raw_score, a.score)


@needs_ort
def test_external_data_gives_the_same_numbers(bottle_bank, exported, bottle_queries, tmp_path):
    folder = export_bank(bottle_bank, tmp_path / "ext", external_data=True)
    assert sorted(json.loads((folder / MANIFEST).read_text())["files"]) == ["model.onnx", "model.onnx.data"]
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    a = Inferencer(folder).predict(bottle_queries[:4])
    b = Inferencer(exported("onnx")).predict(bottle_queries[:4])
    assert np.array_equal(a.score, b.score)


# --- without torch ----------------------------------------------------------------------------------------
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "open_clip"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
from musc_fast.deploy import Inferencer
p = Inferencer(sys.argv[1]).predict(sys.argv[2])
assert not any(m.split(".")[0] == "torch" for m in sys.modules)
print(repr(p.score), p.label, p.anomaly_map.shape)
from musc_fast.cli import main
raise SystemExit(main(["predict", "--model", sys.argv[1], sys.argv[2]]))
"""


@needs_ort
def test_deploy_runs_where_torch_cannot_be_imported(exported, bottle_ref, bottle_queries):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(exported("onnx")), bottle_queries[0]],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    first = res.stdout.splitlines()[0].split()
    assert abs(float(first[0]) - bottle_ref.image_scores[0]) < ATOL_FP32
    assert first[1] == str(bool(bottle_ref.image_scores[0] > Inferencer(exported("onnx")).image_threshold))
    assert res.stdout.splitlines()[1] == "image,score,label"


# --- bad input: one line each, nothing lost ------------------------------------------------------------
def _predict_fails(folder: Path, image: str, capsys, match: str) -> None:
    assert main(["predict", "--model", str(folder), image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


@needs_ort
def test_missing_file(exported, bottle_queries, tmp_path, capsys):
    folder = _copy(exported("onnx"), tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="model.onnx: missing"):
        Inferencer(folder)
    _predict_fails(folder, bottle_queries[0], capsys, "missing")
    (folder / MANIFEST).unlink()
    _predict_fails(folder, bottle_queries[0], capsys, "model.json: missing")


@needs_ov
def test_edited_file(exported, bottle_queries, tmp_path, capsys):
    folder = _copy(exported("openvino"), tmp_path)
    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (folder / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="model.bin: checksum mismatch"):
        Inferencer(folder)
    _predict_fails(folder, bottle_queries[0], capsys, "checksum mismatch")


@needs_ort
def test_edited_json_and_other_version(exported, bottle_queries, tmp_path, capsys):
    folder = _copy(exported("onnx"), tmp_path)
    meta = json.loads((folder / MANIFEST).read_text())
    edited = {**meta, "thresholds": {**meta["thresholds"], "image": 99.0}}
    (folder / MANIFEST).write_text(json.dumps(edited))
    _predict_fails(folder, bottle_queries[0], capsys, "the JSON was edited")
    newer = {**meta, "format_version": 2, "musc_fast_version": "9.0"}
    newer["meta_checksum"] = meta_checksum(newer)  # a consistent file of another version
    (folder / MANIFEST).write_text(json.dumps(newer))
    _predict_fails(folder, bottle_queries[0], capsys, "model format version 2 (musc_fast 9.0)")
    (folder / MANIFEST).write_text("{not json")
    _predict_fails(folder, bottle_queries[0], capsys, "not readable JSON")


@needs_ort
def test_unreadable_and_missing_images(exported, tmp_path, capsys):
    bad = tmp_path / "truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    _predict_fails(exported("onnx"), str(bad), capsys, "truncated.png: cannot read image")
    _predict_fails(exported("onnx"), str(tmp_path / "nope.png"), capsys, "nope.png: no such image file")
    with pytest.raises(ImageInputError, match="uint8"):
        Inferencer(exported("onnx")).predict(np.zeros((8, 8, 2), dtype=np.uint8))


@needs_ov
def test_corrupt_runtime_cache_is_rebuilt(exported, bottle_queries, tmp_path):
    cache = tmp_path / "cache"
    first = Inferencer(exported("openvino"), cache_dir=cache)
    blob = first.cache_path()
    assert blob.is_file() and blob.stat().st_size > 1000
    ref = first.predict(bottle_queries[:2])
    again = Inferencer(exported("openvino"), cache_dir=cache)  # from the blob
    assert np.array_equal(again.predict(bottle_queries[:2]).score, ref.score)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 3])  # truncated
    with pytest.warns(RuntimeWarning, match="runtime cache .* is unreadable"):
        rebuilt = Inferencer(exported("openvino"), cache_dir=cache)
    assert np.array_equal(rebuilt.predict(bottle_queries[:2]).score, ref.score)
    assert blob.stat().st_size > 1000 and not [p for p in cache.iterdir() if p.suffix == ".tmp"]


@needs_ov
def test_every_openvino_model_shares_one_core(exported, monkeypatch):
    # A second Core importing a blob after convert_model corrupted the heap (SIGSEGV later, OpenVINO 2026.4.1).
    import openvino as ov

    from musc_fast.deploy.openvino_core import shared_core

    core = shared_core()

    def no_new_core(*args, **kwargs):
        raise AssertionError("a second openvino.Core was created")
    monkeypatch.setattr(ov, "Core", no_new_core)
    Inferencer(exported("openvino"))
    Inferencer(exported("onnx"), runtime="openvino")
    assert shared_core() is core


def test_export_cli_bad_inputs_touch_nothing(bottle_bank, tmp_path, capsys):
    bank_file = bottle_bank.save(tmp_path / "bank.safetensors")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["export", "--bank", str(bank_file), "--out", str(busy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no musc_fast model" in err[0]
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bank_file.read_bytes()[:-10])
    assert main(["export", "--bank", str(broken), "--out", str(tmp_path / "m")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    assert main(["export", "--bank", str(bank_file), "--out", str(tmp_path / "m"),
                 "--threshold-quantile", "1.5"]) == 2
    assert "--threshold-quantile must be in [0, 1]" in capsys.readouterr().err


@needs_ort
def test_failed_re_export_keeps_the_old_model(bottle_bank, tmp_path, monkeypatch):
    folder = export_bank(bottle_bank, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import musc_fast.export.writer as writer

    def boom(*a, **k):
        raise ExportError("simulated failure")
    monkeypatch.setattr(writer, "_self_check", boom)
    with pytest.raises(ExportError, match="simulated"):
        export_bank(bottle_bank, folder, fmt="onnx")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left


@needs_ort
def test_export_cli_writes_a_model_that_predict_runs(bottle_bank, bottle_ref, bottle_queries, tmp_path, capsys):
    bank_file = bottle_bank.save(tmp_path / "bank.safetensors")
    out = tmp_path / "model"
    assert main(["export", "--bank", str(bank_file), "--out", str(out), "--format", "onnx"]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = json.loads((out / MANIFEST).read_text())
    assert meta["bank"]["images"] == len(bottle_bank) and len(meta["bank"]["sha256"]) == 64
    assert meta["preprocessing"]["resize"] == "bilinear" and meta["preprocessing"]["image_size"] == SIZE
    assert main(["predict", "--model", str(out), *bottle_queries[:3]]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "image,score,label" and len(rows) == 4
    for row, ref in zip(rows[1:], bottle_ref.image_scores[:3]):
        assert abs(float(row.split(",")[1]) - ref) < ATOL_FP32


def test_build_graph_refuses_a_one_image_bank(bottle_bank):
    one = Bank.from_features([t[:1] for t in bottle_bank.tokens], config=bottle_bank.config)
    with pytest.raises(ExportError, match="at least 2"):
        build_graph(one)


def test_package_init_is_lazy_and_keeps_its_names():
    """``import musc_fast`` imports no torch; the public names and ``musc_fast.<submodule>`` still work."""
    code = ("import sys, musc_fast\n"
            "assert 'torch' not in sys.modules, 'import musc_fast imported torch'\n"
            "from musc_fast import MuSc, MuScConfig, Result, score_features, PRESETS, __version__\n"
            "from musc_fast import *\n"
            "assert MuSc.__module__ == 'musc_fast.pipeline' and 'offline' in PRESETS\n"
            "assert callable(musc_fast.ops.lnamd_multi) and 'MuSc' in dir(musc_fast)\n"
            "try:\n    musc_fast.no_such_name\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
