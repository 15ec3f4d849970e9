"""Issue 10 items 1-6: input that used to give wrong numbers without a word, on real images (mtd).

Masks saved as 0/1, RGB or anti-aliased; masks of another size; tensors in 0..255 / uint8, lone
paths, mixed lists; .gif/.webp/.txt files, test/Good, extra category folders; NaN float images;
EXIF orientation. The tiny offline backbone (tests/fakes.py) keeps every run fast.
"""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import tests.fakes  # noqa: F401 - registers tiny_test
from musc_fast.backbones.base import IMAGENET_PREPROCESS
from musc_fast.checks import InputWarning, NonFiniteError, check_finite_tokens
from musc_fast.config import MuScConfig
from musc_fast.data import (
    DatasetError,
    check_mask_sizes,
    list_categories,
    load_category,
    load_category_masks,
    load_images_checked,
    preprocess_image,
    upright,
)
from musc_fast.pipeline import MuSc
from tests.conftest import shared_path

S = 64


def _config(**kw) -> MuScConfig:
    return MuScConfig(backbone="tiny_test", pretrained=None, image_size=S, layers=(0, 1), device="cpu",
                      precision="fp32", **kw)


@pytest.fixture
def mtd_copy(tmp_path):
    """A small copy of mtd's magnetic_tile: 3 good and 3 crack images with their 0/255 masks."""
    src = shared_path("datasets", "mtd", "magnetic_tile")
    cat = tmp_path / "data" / "magnetic_tile"
    for t, n in (("good", 3), ("crack", 3)):
        (cat / "test" / t).mkdir(parents=True)
        for p in sorted((src / "test" / t).iterdir())[:n]:
            shutil.copy(p, cat / "test" / t / p.name)
            if t != "good":
                (cat / "ground_truth" / t).mkdir(parents=True, exist_ok=True)
                m = src / "ground_truth" / t / f"{p.stem}_mask.png"
                shutil.copy(m, cat / "ground_truth" / t / m.name)
    return tmp_path / "data"


def _masks(root, **kw):
    cat = load_category("mvtec", root, "magnetic_tile")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_category_masks(cat, S, num_workers=0, progress=False, **kw)
    return m, [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


def _rewrite_masks(root, fn):
    for p in sorted((root / "magnetic_tile" / "ground_truth" / "crack").iterdir()):
        arr = np.asarray(Image.open(p))
        fn(arr).save(p)


# ------------------------------------------------------------------------------------------------
# 1. mask binarisation


def test_default_threshold_keeps_the_original_numbers_on_real_0_255_masks():
    # every crack mask of mtd at 224 px: the new default (threshold 0) equals the original's rule
    root = shared_path("datasets", "mtd")
    cat = load_category("mvtec", root, "magnetic_tile")
    new = load_category_masks(cat, 224, threshold=0, num_workers=0, progress=False)
    old = load_category_masks(cat, 224, threshold=None, num_workers=0, progress=False)
    assert new.any() and torch.equal(new, old)


@pytest.mark.parametrize("variant", ["zero_one", "rgb_red", "palette"])
def test_masks_saved_as_0_1_or_colour_count_every_marked_pixel(mtd_copy, variant):
    before, notes = _masks(mtd_copy)
    assert before.any() and notes == []
    if variant == "zero_one":
        _rewrite_masks(mtd_copy, lambda a: Image.fromarray((a > 0).astype(np.uint8)))
    elif variant == "rgb_red":
        _rewrite_masks(mtd_copy, lambda a: Image.fromarray(np.dstack([a, a * 0, a * 0])))
    else:
        _rewrite_masks(mtd_copy, lambda a: Image.fromarray((a > 0).astype(np.uint8)).convert("P"))
    after, notes = _masks(mtd_copy)
    assert torch.equal(after, before) and notes == []
    # the original's rule loses every defect pixel of a 0/1 mask, and says so now
    if variant == "zero_one":
        lost, notes = _masks(mtd_copy, threshold=None)
        assert not lost.any()
        assert len(notes) == 1 and "'magnetic_tile'" in notes[0] and "none of the masks" in notes[0]


def test_anti_aliased_masks_and_the_threshold(mtd_copy):
    before, _ = _masks(mtd_copy)
    _rewrite_masks(mtd_copy, lambda a: Image.fromarray(a).filter(ImageFilter.GaussianBlur(3)))
    soft0, notes = _masks(mtd_copy)  # any non-zero pixel: the blurred halo counts too
    peak = max(int(np.asarray(Image.open(m)).max())
               for m in (mtd_copy / "magnetic_tile" / "ground_truth" / "crack").iterdir())
    assert 0 < peak < 255  # thin cracks: the blur leaves no pixel at 255
    soft128, _ = _masks(mtd_copy, threshold=peak // 2)
    original, _ = _masks(mtd_copy, threshold=None)  # only pixels staying 255: nearly nothing left
    assert notes == []
    assert soft0.sum() > before.sum() >= 0 and (before & ~soft0).sum() == 0
    assert 0 < soft128.sum() < soft0.sum()
    assert original.sum() == 0 < soft128.sum()


def test_mask_threshold_is_validated():
    for bad in (-1, 255, 1.5, True):
        with pytest.raises(ValueError, match="mask_threshold"):
            _config(mask_threshold=bad)
    assert _config(mask_threshold=None).mask_threshold is None


def test_cli_mask_threshold_flag_reaches_the_config():
    from musc_fast.cli import build_parser, config_from_settings, merged_settings

    for given, want in (("7", 7), ("original", None)):
        args = build_parser().parse_args(["run", "--dataset", "mvtec", "--data-path", ".", "--backbone",
                                          "tiny_test", "--mask-threshold", given])
        assert config_from_settings(merged_settings(args)).mask_threshold == want


def test_run_pixel_metrics_with_0_1_masks_equal_those_with_0_255(mtd_copy, tmp_path):
    from musc_fast.runner import RunOptions, run

    def metrics(out):
        opts = RunOptions(dataset="mvtec", data_path=str(mtd_copy), out=str(out), progress=False, num_workers=0)
        return run(_config(), opts, log=lambda _: None).per_category["magnetic_tile"]

    ref = metrics(tmp_path / "a")
    assert ref["metrics"]["auroc_px"] is not None and ref["metrics"]["aupro"] is not None
    _rewrite_masks(mtd_copy, lambda a: Image.fromarray((a > 0).astype(np.uint8)))
    got = metrics(tmp_path / "b")
    assert got["metrics"] == ref["metrics"] and got["warnings"] == ref["warnings"]
    assert not any("mask" in w for w in got["warnings"])


# ------------------------------------------------------------------------------------------------
# 2. masks of another size


def test_resized_mask_warns_naming_the_file_and_strict_refuses(mtd_copy):
    first = sorted((mtd_copy / "magnetic_tile" / "ground_truth" / "crack").iterdir())[0]
    Image.open(first).resize((128, 96), Image.NEAREST).save(first)
    _, notes = _masks(mtd_copy)
    assert len(notes) == 1 and first.name in notes[0] and "128x96" in notes[0] and "resized" in notes[0]
    with pytest.raises(DatasetError, match=first.name):
        check_mask_sizes(load_category("mvtec", mtd_copy, "magnetic_tile"))

    from musc_fast.runner import RunOptions, preflight

    with pytest.raises(DatasetError, match="--strict"):
        preflight(RunOptions(dataset="mvtec", data_path=str(mtd_copy), strict=True))


# ------------------------------------------------------------------------------------------------
# 3. the Python API's inputs


def test_api_tensors_uint8_and_range(mtd_copy):
    paths = sorted((mtd_copy / "magnetic_tile" / "test").rglob("*.png"))
    arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((S, S))) for p in paths])
    u8 = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    model = MuSc(_config())
    ref = model.score(u8.float() / 255, progress=False)
    got = model.score(u8, progress=False)
    np.testing.assert_array_equal(got.image_scores, ref.image_scores)
    with pytest.raises(ValueError, match=r"\[0, 1\].*0\.\.255"):
        model.score(u8.float(), progress=False)
    with pytest.raises(ValueError, match="uint8"):
        model.score(u8.to(torch.int32), progress=False)
    bad = u8.float() / 255
    bad[2, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="positions 2"):
        model.score(bad, progress=False)


def test_api_lone_path_and_mixed_lists(mtd_copy):
    paths = sorted((mtd_copy / "magnetic_tile" / "test").rglob("*.png"))
    model = MuSc(_config())
    one = model.preprocess(str(paths[0]), progress=False)
    assert one.shape == (1, 3, S, S)
    assert torch.equal(model.preprocess(paths[0], progress=False), one)
    ref = model.score([str(p) for p in paths], progress=False)
    mixed = [str(p) if i % 2 else Image.open(p) for i, p in enumerate(paths)]
    got = model.score(mixed, progress=False)
    np.testing.assert_array_equal(got.image_scores, ref.image_scores)


# ------------------------------------------------------------------------------------------------
# 4. what the readers leave out


def test_gif_webp_read_other_files_listed_capital_good_and_extra_category(mtd_copy):
    cat_dir = mtd_copy / "magnetic_tile"
    good = sorted((cat_dir / "test" / "good").iterdir())
    Image.open(good[0]).save(good[0].with_suffix(".webp"), lossless=True)
    Image.open(good[1]).convert("L").save(good[1].with_suffix(".gif"))
    good[0].unlink()
    good[1].unlink()
    (cat_dir / "test" / "good" / "notes.txt").write_text("not an image")
    (cat_dir / "test" / "good").rename(cat_dir / "test" / "Good")
    shutil.copytree(cat_dir, mtd_copy / "my_tiles")  # not an official MVTec name
    (mtd_copy / "readme_folder").mkdir()  # no test/: not a category

    assert list_categories("mvtec", mtd_copy) == ["magnetic_tile", "my_tiles"]
    cat = load_category("mvtec", mtd_copy, "magnetic_tile")
    assert sorted(p.suffix for p in cat.paths if p.parent.name == "Good") == [".gif", ".png", ".webp"]
    assert cat.labels.count(0) == 3  # test/Good is normal
    assert list(cat.left_out) == [cat_dir / "test" / "Good" / "notes.txt"]
    unofficial, line = cat.input_notes()  # magnetic_tile is not an MVTec AD name either
    assert "not one of the 15 official" in unofficial
    assert "1 file(s) not read" in line and ".txt" in line and "notes.txt" in line
    assert "not one of the 15 official" in load_category("mvtec", mtd_copy, "my_tiles").input_notes()[0]
    loaded = load_images_checked(cat.paths, S, IMAGENET_PREPROCESS, num_workers=0, progress=False)
    assert loaded.failures == {}

    from musc_fast.runner import RunOptions, run

    opts = RunOptions(dataset="mvtec", data_path=str(mtd_copy), out=str(mtd_copy.parent / "out"), progress=False,
                      num_workers=0)
    summary = run(_config(), opts, log=lambda _: None)
    assert sorted(summary.per_category) == ["magnetic_tile", "my_tiles"] and not summary.failures
    entry = summary.per_category["magnetic_tile"]
    assert entry["n_images"] == 6
    assert [s["path"] for s in entry["skipped"]] == [str(cat_dir / "test" / "Good" / "notes.txt")]
    assert any("not read" in w for w in entry["warnings"])
    assert any("not one of the 15 official" in w for w in summary.per_category["my_tiles"]["warnings"])


# ------------------------------------------------------------------------------------------------
# 5. NaN images and the NaN-token message


def test_nan_float_tiff_is_named_not_scored_as_black(mtd_copy):
    good = sorted((mtd_copy / "magnetic_tile" / "test" / "good").iterdir())[0]
    arr = np.asarray(Image.open(good).convert("L"), dtype=np.float32)
    arr[:10] = np.nan
    tif = good.with_suffix(".tif")
    Image.fromarray(arr, mode="F").save(tif)
    loaded = load_images_checked([good, tif], S, IMAGENET_PREPROCESS, num_workers=0, progress=False)
    assert list(loaded.failures) == [1]
    assert str(tif) in loaded.failures[1] and "NaN/Inf" in loaded.failures[1]
    with pytest.raises(DatasetError, match="image 0.*NaN/Inf"):
        MuSc(_config()).preprocess([Image.open(tif), Image.open(good)], progress=False)
    finite = Image.fromarray(np.nan_to_num(arr), mode="F")
    assert preprocess_image(finite, S, IMAGENET_PREPROCESS).isfinite().all()


def test_nan_token_message_blames_fp16_only_for_half_features():
    t = torch.zeros(3, 4, 8)
    t[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as fp32:
        check_finite_tokens([t], None)
    assert "not a half-precision overflow" in str(fp32.value) and "input images" in str(fp32.value)
    with pytest.raises(NonFiniteError) as fp16:
        check_finite_tokens([t.half()], None)
    assert "float16: an overflow? try --precision fp32" in str(fp16.value)


# ------------------------------------------------------------------------------------------------
# 6. EXIF orientation


def test_exif_orientation_is_honoured_for_images_and_masks(mtd_copy, tmp_path):
    cat = load_category("mvtec", mtd_copy, "magnetic_tile")
    s = next(x for x in cat.samples if x.mask_path is not None)
    img, mask = Image.open(s.path), Image.open(s.mask_path)
    assert upright(img) is img  # standard data: no tag, unchanged (same numbers)
    ref_px = preprocess_image(img, S, IMAGENET_PREPROCESS)
    ref_mask, _ = _masks(mtd_copy)
    idx = cat.samples.index(s)
    # stored turned by 90 degrees with orientation 6 ("rotate 90 clockwise to view"): as a camera writes it
    exif = Image.Exif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(s.path, exif=exif.tobytes())
    mask.transpose(Image.Transpose.ROTATE_90).save(s.mask_path, exif=exif.tobytes())
    turned = Image.open(s.path)
    assert turned.getexif()[0x0112] == 6
    assert torch.equal(preprocess_image(turned, S, IMAGENET_PREPROCESS), ref_px)
    got_mask, notes = _masks(mtd_copy)
    assert notes == [] and torch.equal(got_mask[idx], ref_mask[idx])
