"""Bad input, built on the fly: each case checks the exact behaviour (message, exit code, what was written).

Exit codes: 0 = done (skipped files and warnings listed), 1 = a category failed (the others ran),
2 = bad input found before anything was scored (one line on stderr, no traceback).
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from musc_fast.backbones import register_backbone
from musc_fast.backbones.base import _REGISTRY, IMAGENET_PREPROCESS
from musc_fast.data import to_rgb
from musc_fast.data.transforms import preprocess_image
from musc_fast.outputs import safe_component, unique_stems
from tests.fakes import TinyBackbone
from tests.reliability_support import TINY, out_root, read_json, run_cli, synthetic_copy


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("pristine")


@pytest.fixture
def data(tmp_path, base) -> Path:
    """A fresh 8-image synthetic category ``texture`` (4 good, 4 defective) that a test may damage."""
    return synthetic_copy(tmp_path / "data", base)


def _run(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "run", "--dataset", "synthetic", "--data-path", data, "--out", out, *TINY, *extra)


def _one_line_error(code: int, err: str, expected_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _scores(root: Path, cat: str = "texture") -> list[dict]:
    with open(root / cat / "scores.csv") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------
# unreadable files: skipped and listed (default) or an error (--strict)

def _damage(data: Path) -> list[Path]:
    good = data / "texture" / "test" / "good"
    truncated = good / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = good / "zz_empty.png"
    empty.write_bytes(b"")
    text = good / "zz_text.png"
    text.write_text("not an image")
    return [truncated, empty, text]


def test_unreadable_images_are_skipped_and_listed(tmp_path, data, capsys):
    bad = _damage(data)
    code, out, _ = _run(capsys, data, tmp_path / "out")
    assert code == 0
    root = out_root(tmp_path / "out")
    entry = read_json(root / "texture" / "result.json")
    assert [s["path"] for s in entry["skipped"]] == [str(p) for p in bad]
    assert all("cannot read file" in s["reason"] and s["path"] in s["reason"] for s in entry["skipped"])
    assert entry["n_images"] == 7  # 8 readable - the truncated one
    summary = read_json(root / "results.json")
    assert [(s["category"], s["path"]) for s in summary["skipped"]] == [("texture", str(p)) for p in bad]
    assert summary["categories"]["texture"]["skipped"] == entry["skipped"]
    assert out.count("[texture] skipped:") == 3
    # the other images score exactly as if the bad files had never been there
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)
    for p in bad:
        (clean / p.relative_to(data)).unlink()
    assert _run(capsys, clean, tmp_path / "out_clean")[0] == 0
    ours, theirs = _scores(root), _scores(out_root(tmp_path / "out_clean"))
    assert [Path(r["path"]).relative_to(data) for r in ours] == [Path(r["path"]).relative_to(clean) for r in theirs]
    assert [(r["raw_score"], r["score"]) for r in ours] == [(r["raw_score"], r["score"]) for r in theirs]
    assert read_json(out_root(tmp_path / "out_clean") / "results.json")["categories"]["texture"]["metrics"] == \
        entry["metrics"]


def test_strict_makes_an_unreadable_image_an_error(tmp_path, data, capsys):
    bad = _damage(data)
    code, _, err = _run(capsys, data, tmp_path / "out", "--strict")
    line = _one_line_error(code, err)
    assert str(bad[0]) in line and "cannot read file" in line and "truncated" in line
    assert not list((tmp_path / "out").rglob("result.json"))


@pytest.mark.parametrize("workers", [0, 2])
def test_load_images_checked_reports_failures_and_sizes(tmp_path, data, workers):
    from musc_fast.data import load_images, load_images_checked

    bad = _damage(data)
    good = sorted((data / "texture" / "test" / "good").glob("00[023].png"))
    paths = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    got = load_images_checked(paths, 32, IMAGENET_PREPROCESS, num_workers=workers, progress=False, batch_size=4)
    assert sorted(got.failures) == [1, 3, 4] and all(str(paths[i]) in got.failures[i] for i in got.failures)
    assert got.sizes.tolist() == [[64, 64], [0, 0], [64, 64], [0, 0], [0, 0], [64, 64]]
    assert torch.equal(got.pixels[[0, 2, 5]], load_images(good, 32, IMAGENET_PREPROCESS, num_workers=0,
                                                          progress=False))
    assert not got.pixels[[1, 3, 4]].any()


def test_all_images_unreadable_fails_the_category(tmp_path, data, capsys):
    for p in (data / "texture" / "test").rglob("*.png"):
        p.write_bytes(b"")
    code, _, err = _run(capsys, data, tmp_path / "out")
    assert code == 1 and "FAILED texture: 8 of 8 image files cannot be read" in err


def test_unreadable_mask_fails_the_category_naming_it(tmp_path, data, capsys):
    mask = data / "texture" / "ground_truth" / "color" / "000_mask.png"
    mask.write_bytes(mask.read_bytes()[:100])
    code, _, err = _run(capsys, data, tmp_path / "out")
    assert code == 1 and f"FAILED texture: {mask}: cannot read file" in err


# ------------------------------------------------------------------------------------------------
# image modes, sizes and shapes

def _grey(rng, h=9, w=11) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))


def test_to_rgb_modes():
    rng = np.random.default_rng(0)
    grey = _grey(rng)
    expect = np.asarray(grey.convert("RGB"))
    wide = np.asarray(grey, dtype=np.uint16) * 257  # the same picture in 16 bits
    for img in (Image.fromarray(wide), Image.fromarray(wide.astype(">u2")), Image.fromarray(wide.astype(np.int32))):
        assert img.mode in ("I;16", "I;16B", "I")
        assert np.array_equal(np.asarray(to_rgb(img)), expect), img.mode
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.9  # PIL's own conversion clips: near white
    # in-between 16-bit values round to the nearest 8-bit level; out-of-range 32-bit values clip
    odd = Image.fromarray(np.array([[128, 129, 65535, 70000, -5]], dtype=np.int32))
    assert np.asarray(to_rgb(odd))[0, :, 0].tolist() == [0, 1, 255, 255, 0]
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (9, 11), dtype=np.uint8)]))
    assert np.array_equal(np.asarray(to_rgb(rgba)), rgb)  # alpha dropped, not composited (the original)
    for mode in ("L", "LA", "P", "1", "CMYK"):
        img = Image.fromarray(rgb).convert(mode)
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB"))), mode


def test_grayscale_16bit_rgba_and_palette_images_run(tmp_path, data, capsys):
    """A category stored as 8-bit grey and the same category stored as 16-bit grey score identically; RGBA
    and palette files are accepted."""
    grey16 = tmp_path / "grey16"
    shutil.copytree(data, grey16)
    for p in sorted((data / "texture" / "test").rglob("*.png")):
        g = Image.open(p).convert("L")
        g.save(p)
        Image.fromarray(np.asarray(g, dtype=np.uint16) * 257).save(grey16 / p.relative_to(data))
        assert Image.open(grey16 / p.relative_to(data)).mode == "I;16"
    assert _run(capsys, data, tmp_path / "o8")[0] == 0
    assert _run(capsys, grey16, tmp_path / "o16")[0] == 0
    s8, s16 = _scores(out_root(tmp_path / "o8")), _scores(out_root(tmp_path / "o16"))
    assert [(r["raw_score"], r["score"]) for r in s8] == [(r["raw_score"], r["score"]) for r in s16]
    good = data / "texture" / "test" / "good"
    Image.open(good / "000.png").convert("RGBA").save(good / "000.png")
    Image.open(good / "001.png").convert("RGB").convert("P").save(good / "001.png")
    code, _, _ = _run(capsys, data, tmp_path / "o_mixed")
    entry = read_json(out_root(tmp_path / "o_mixed") / "texture" / "result.json")
    assert code == 0 and entry["skipped"] == [] and entry["n_images"] == 8


def test_tiny_image_is_upsampled_with_a_warning_and_non_square_is_squashed(tmp_path, data, capsys):
    good = data / "texture" / "test" / "good"
    Image.new("RGB", (5, 4), (200, 10, 10)).save(good / "002.png")
    Image.open(good / "003.png").resize((64, 32)).save(good / "003.png")
    code, out, _ = _run(capsys, data, tmp_path / "out")
    entry = read_json(out_root(tmp_path / "out") / "texture" / "result.json")
    assert code == 0 and entry["n_images"] == 8 and entry["skipped"] == []
    assert len(entry["warnings"]) == 1, entry["warnings"]  # only the tiny one: non-square is fine
    note = entry["warnings"][0]
    assert "1 image(s) smaller than one 8-pixel patch, upsampled to 64x64" in note and "002.png (5x4)" in note
    assert f"[texture] warning: {note}" in out
    x = preprocess_image(Image.open(good / "003.png"), 64, IMAGENET_PREPROCESS)
    assert x.shape == (3, 64, 64)


def test_image_size_not_a_multiple_of_the_patch(tmp_path, data, capsys):
    code, _, err = _run(capsys, data, tmp_path / "out", "--image-size", "60")
    line = _one_line_error(code, err)
    assert "image size 60 is not a multiple of tiny_test's patch size 8" in line and "use 56 or 64" in line
    assert not (tmp_path / "out").exists()
    code, out, _ = _run(capsys, data, tmp_path / "out", "--image-size", "60", "--compat")
    assert code == 0 and "the last 4 pixel rows and columns are ignored, as in the original" in out
    summary = read_json(out_root(tmp_path / "out", size=60) / "results.json")
    assert any("ignored, as in the original" in w for w in summary["warnings"])
    code, _, err = _run(capsys, data, tmp_path / "out", "--image-size", "4")
    assert "smaller than tiny_test's patch size 8" in _one_line_error(code, err)


# ------------------------------------------------------------------------------------------------
# model settings: backbone, tag, weights, layers, r

class _Tagged(TinyBackbone):
    pass


@register_backbone("tiny_tagged") if "tiny_tagged" not in _REGISTRY else (lambda f: f)
def _build_tagged(name, *, pretrained, weights, image_size, layers, quick_gelu, compat):
    """Mimics the real builders' messages: unknown tags list the valid ones; a weights file of another
    architecture names the first mismatched key (over two lines, as torch's messages are)."""
    if weights is None and pretrained not in ("alpha", "beta"):
        raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; valid tags: alpha, beta")
    model = _Tagged(layers)
    if weights is not None:
        from safetensors.torch import load_file

        sd, expected = load_file(weights), model.state_dict()
        bad = [k for k in expected if k not in sd or sd[k].shape != expected[k].shape]
        if bad:
            k = bad[0]
            raise ValueError(f"{weights}: weights do not fit this architecture:\n  first mismatched key {k!r}: "
                             f"file has {tuple(sd[k].shape) if k in sd else None}, model expects "
                             f"{tuple(expected[k].shape)}")
        model.load_state_dict(sd)
    return model


def test_unknown_backbone_lists_the_valid_ones(tmp_path, data, capsys):
    code, _, err = _run(capsys, data, tmp_path / "out", "--backbone", "nosuch")
    line = _one_line_error(code, err)
    assert "unknown backbone 'nosuch'; valid backbones:" in line and "tiny_test" in line
    assert not (tmp_path / "out").exists()


def test_unknown_tag_and_wrong_weights_are_one_line_exit_2(tmp_path, data, capsys):
    code, _, err = _run(capsys, data, tmp_path / "out", "--backbone", "tiny_tagged", "--pretrained", "gamma")
    assert "unknown pretrained tag 'gamma' for tiny_tagged; valid tags: alpha, beta" in _one_line_error(code, err)
    from safetensors.torch import save_file

    wrong = tmp_path / "other_arch.safetensors"
    save_file({"stem": torch.zeros(16, 6), "mix": torch.zeros(3, 16, 16)}, str(wrong))
    code, _, err = _run(capsys, data, tmp_path / "out", "--backbone", "tiny_tagged", "--weights", wrong)
    line = _one_line_error(code, err)
    assert str(wrong) in line and "first mismatched key 'stem': file has (16, 6), model expects (32, 6)" in line
    assert not (tmp_path / "out").exists()
    # the right file loads
    right = tmp_path / "right.safetensors"
    save_file(_Tagged((0, 2)).state_dict(), str(right))
    assert _run(capsys, data, tmp_path / "out", "--backbone", "tiny_tagged", "--weights", right)[0] == 0


def test_pretrained_none_means_random_weights(tmp_path, data, capsys):
    code, _, err = _run(capsys, data, tmp_path / "out", "--backbone", "tiny_tagged", "--pretrained", "none")
    assert "unknown pretrained tag None" in _one_line_error(code, err)  # None reached the builder


def test_layers_out_of_range(tmp_path, data, capsys):
    code, _, err = _run(capsys, data, tmp_path / "out", "--layers", "0", "5")
    assert "tiny_test has 3 layers (0..2), got [0, 5]" in _one_line_error(code, err)  # the builder's own check


def test_layers_out_of_range_for_a_builder_that_does_not_check(tmp_path, data, capsys):
    from tests.production_support import register_fake

    register_fake()  # depth 2, ignores the layers it is given
    code, _, err = _run(capsys, data, tmp_path / "out", "--backbone", "_fake_test", "--layers", "0", "4")
    line = _one_line_error(code, err)
    assert "layers [0, 4] out of range for _fake_test: it has 2 tappable layers, valid indices 0..1" in line


@pytest.mark.parametrize("r", [["1", "2"], ["0"], ["-3"]])
def test_r_must_be_odd_and_positive(tmp_path, data, capsys, r):
    code, _, err = _run(capsys, data, tmp_path / "out", "--r-list", *r)
    assert f"r_list values must be odd and positive, got [{', '.join(r)}]" in _one_line_error(code, err)


# ------------------------------------------------------------------------------------------------
# categories

def test_empty_category_stops_before_scoring(tmp_path, data, capsys):
    (data / "object" / "test" / "good").mkdir(parents=True)
    code, _, err = _run(capsys, data, tmp_path / "out")  # --category all
    line = _one_line_error(code, err)
    assert str(data / "object" / "test") in line and "no images found" in line
    assert not (tmp_path / "out").exists()  # texture was not scored either


def test_one_image_category(tmp_path, data, capsys):
    single = data / "single" / "test" / "good"
    single.mkdir(parents=True)
    shutil.copy(data / "texture" / "test" / "good" / "000.png", single)
    code, _, err = _run(capsys, data, tmp_path / "out", "--category", "texture", "single")
    line = _one_line_error(code, err)
    assert f"{data / 'single'}: 1 test image(s) in category 'single'; MuSc needs at least 2" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../x", "texture/../texture", "/etc", ".."])
def test_category_must_be_a_folder_name(tmp_path, data, capsys, name):
    code, _, err = _run(capsys, data, tmp_path / "out", "--category", name)
    assert f"category {name!r}: expected a folder name inside the data set root" in _one_line_error(code, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# NaN / Inf

def test_nan_features_fail_the_category_naming_the_file(tmp_path, data, capsys):
    const = data / "texture" / "test" / "good" / "002.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(const)
    code, _, err = _run(capsys, data, tmp_path / "out", "--backbone", "tiny_nan")
    assert code == 1
    line = next(x for x in err.splitlines() if x.startswith("FAILED texture"))
    assert "non-finite backbone features (NaN/Inf in layer 0, layer 1) for 1 image(s) at positions 4" in line
    assert f"(first file: {const})" in line
    root = out_root(tmp_path / "out", backbone="tiny_nan")
    assert not (root / "texture" / "result.json").exists()
    assert "texture" in read_json(root / "results.json")["failures"]


def test_compat_nan_scores_are_flagged_not_silent(tmp_path, base, capsys):
    data = synthetic_copy(tmp_path / "small", base, n_good=2, n_defect=2)  # N = 4: k = floor(0.3 * 3) = 0
    code, out, err = _run(capsys, data, tmp_path / "compat", "--compat")
    root = out_root(tmp_path / "compat")
    entry = read_json(root / "texture" / "result.json")
    assert code == 0 and "FLAGGED texture: 4 of 4 image scores are not finite" in err
    assert entry["flags"] and all(v is None for v in entry["metrics"].values())
    assert read_json(root / "results.json")["flagged"]["texture"].startswith("4 of 4 image scores")
    row = next(r for r in csv.DictReader(open(root / "results.csv")) if r["category"] == "texture")
    assert row["auroc_sp"] == "" and row["auroc_px"] == ""
    # default mode: the interval is widened to one image (warned), every number finite
    code, out, err = _run(capsys, data, tmp_path / "default")
    entry = read_json(out_root(tmp_path / "default") / "texture" / "result.json")
    assert code == 0 and not entry["flags"] and "FLAGGED" not in err
    assert all(v is not None for v in entry["metrics"].values())
    assert any("averaging one image instead" in w for w in entry["warnings"])


# ------------------------------------------------------------------------------------------------
# output names cannot escape the output folder

@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=20))
def test_safe_component_is_one_harmless_component(name):
    c = safe_component(name)
    assert c and "/" not in c and "\\" not in c and c not in (".", "..") and not c.startswith(".")
    root = Path("/out/root")
    assert (root / c).resolve().parent == root.resolve()


def test_unique_stems():
    paths = [Path("a/x y.png"), Path("a/x y.jpg"), Path("a/x_y.png"), Path("a/b.png")]
    stems = unique_stems(paths)
    assert len(set(stems)) == 4 and stems[3] == "b"


def test_odd_names_stay_inside_the_output_folder(tmp_path, capsys):
    rng = np.random.default_rng(3)
    cat = tmp_path / "data" / "we ird%cat..."
    files = [cat / "test" / "good" / "x y.png", cat / "test" / "good" / "x y.jpg", cat / "test" / "good" / "a.png",
             cat / "test" / "bad one" / "b..c.png", cat / "test" / "bad one" / "x y.png"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(f)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--dataset", "folder", "--data-path", tmp_path / "data", "--out", out,
                           *TINY, "--vis", "overlay")
    assert code == 0, err
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(out.resolve() in p.resolve().parents for p in written)
    root = out_root(out, dataset="folder")
    pngs = sorted(str(p.relative_to(root)) for p in root.rglob("*.png") if "fullres" not in p.parts)
    assert pngs == ["we_ird_cat/overlay/bad_one/b..c.png", "we_ird_cat/overlay/bad_one/x_y.png",
                    "we_ird_cat/overlay/good/a.png", "we_ird_cat/overlay/good/x_y_jpg.png",
                    "we_ird_cat/overlay/good/x_y_png.png"]
