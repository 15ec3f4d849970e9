"""Data readers, transforms, parallel decoding, the divide_num split and the synthetic set."""
from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T

from musc_fast.backbones.base import CLIP_PREPROCESS, IMAGENET_PREPROCESS
from musc_fast.data import (
    UNLABELED,
    DatasetError,
    Sample,
    available,
    binarise_mask,
    divide_indices,
    generate_synthetic,
    list_categories,
    load_category,
    load_images,
    load_mask,
    load_masks,
    preprocess_image,
)
from musc_fast.data.synthetic import DEFECT_TYPES, make_image
from tests.conftest import shared_path

# ------------------------------------------------------------------------------------------------
# helpers


def _png(path: Path, value: int = 128, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 255 - value)).save(path)
    return path


def _mvtec_tree(root: Path, cat: str = "bottle", defects=("crack", "scratch"), n: int = 3, good: str = "good",
                mask_name=lambda stem: f"{stem}_mask.png", img_ext: str = ".png") -> Path:
    for i in range(n):
        _png(root / cat / "test" / good / f"{i:03d}{img_ext}", 10 * i)
    for d in defects:
        for i in range(n):
            _png(root / cat / "test" / d / f"{i:03d}{img_ext}", 100 + i)
            _png(root / cat / "ground_truth" / d / mask_name(f"{i:03d}"), 255, mode="L")
    return root / cat


def _raises(match_path: Path, fn, *args):
    with pytest.raises(DatasetError) as info:
        fn(*args)
    msg = str(info.value)
    assert str(match_path) in msg, msg
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------
# real data sets


def test_bottle_order_labels_and_no_masks():
    root = shared_path("datasets", "mvtec_bottle")
    assert list_categories("mvtec", root) == ["bottle"]
    cat = load_category("mvtec", root, "bottle")
    assert len(cat) == 83 and cat.dataset == "mvtec" and cat.mask_rule == "eq1"
    assert cat.has_masks is False and cat.has_labels is True
    assert all(m is None for m in cat.mask_paths)
    counts = {"broken_large": 20, "broken_small": 22, "contamination": 21, "good": 20}
    expected_types = [t for t in sorted(counts) for _ in range(counts[t])]
    assert cat.defect_types == expected_types
    assert cat.labels == [int(t != "good") for t in expected_types]
    # files sorted within each type folder, and they are the files on disk
    for t in counts:
        names = [p.name for p in cat.paths if p.parent.name == t]
        assert names == sorted(p.name for p in (root / "bottle" / "test" / t).iterdir())
    assert cat.paths[0].name == "000.png" and cat.paths[0].parent.name == "broken_large"
    # the "mvtec_ad" alias of the original reads the same
    assert load_category("mvtec_ad", root, "bottle").paths == cat.paths


def test_mtd_order_labels_and_pairing_by_name():
    root = shared_path("datasets", "mtd")
    assert list_categories("folder", root) == ["magnetic_tile"]
    cat = load_category("folder", root, "magnetic_tile")
    counts = {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "good": 150, "uneven": 103}
    assert len(cat) == 542 and cat.has_masks
    assert cat.defect_types == [t for t in sorted(counts) for _ in range(counts[t])]
    assert sum(cat.labels) == 392
    for s in cat.samples:
        if s.label == 0:
            assert s.mask_path is None
        else:
            assert s.mask_path.name == s.path.stem + "_mask.png"
            assert s.mask_path.parent == root / "magnetic_tile" / "ground_truth" / s.defect_type
    known = next(s for s in cat.samples if s.path.name == "exp1_num_108719.png")
    assert known.defect_type == "blowhole" and known.label == 1
    assert known.mask_path == root / "magnetic_tile/ground_truth/blowhole/exp1_num_108719_mask.png"
    assert load_mask(known.mask_path, 256, "eq1").any()
    # README: four uneven images have all-zero masks; they keep a mask path and load empty
    empty = next(s for s in cat.samples if s.path.stem == "exp3_num_45042")
    assert empty.mask_path is not None and not load_mask(empty.mask_path, 256, "eq1").any()


def test_real_mask_matches_torchvision_pipeline():
    root = shared_path("datasets", "mtd", "magnetic_tile")
    path = sorted((root / "ground_truth" / "crack").iterdir())[0]
    ref = T.Compose([T.Resize((224, 224)), T.ToTensor()])(Image.open(path))[0]
    ref_vl = T.Compose([T.Resize((224, 224)), T.ToTensor()])(Image.open(path).convert("L"))[0]
    assert torch.equal(load_mask(path, 224, "eq1"), ref == 1.0)
    assert torch.equal(load_mask(path, 224, "gt0"), ref_vl > 0)
    assert (ref_vl > 0).sum() > (ref == 1.0).sum()  # the downscale softened edges


# ------------------------------------------------------------------------------------------------
# mask binarisation


def _soft_edge_mask() -> Image.Image:
    arr = np.zeros((8, 8), np.uint8)
    arr[2:6, 3:7] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [20, 5, 37])
def test_mask_rules_on_soft_edges(size):
    m = _soft_edge_mask()
    ref = T.Compose([T.Resize((size, size)), T.ToTensor()])(m)[0]
    eq1 = torch.from_numpy(binarise_mask(m, size, "eq1"))
    gt0 = torch.from_numpy(binarise_mask(m, size, "gt0"))
    assert torch.equal(eq1, ref == 1.0)
    assert torch.equal(gt0, ref > 0)
    soft = (ref > 0) & (ref < 1)
    assert soft.any()  # the resize made a soft edge...
    assert not eq1[soft].any() and gt0[soft].all()  # ...which eq1 drops and gt0 keeps
    assert eq1.sum() < gt0.sum()
    assert (eq1 & ~gt0).sum() == 0


def test_mask_modes():
    m = _soft_edge_mask()
    rgb = Image.merge("RGB", [m, m, m])
    assert np.array_equal(binarise_mask(rgb, 20, "eq1"), binarise_mask(m, 20, "eq1"))
    one = m.convert("1")  # PIL resizes 1-bit images with NEAREST: no soft edge, all set pixels kept
    ref = T.Compose([T.Resize((20, 20)), T.ToTensor()])(one)[0]
    assert np.array_equal(binarise_mask(one, 20, "eq1"), (ref == 1.0).numpy())
    nearest = np.asarray(m.resize((20, 20), Image.NEAREST)) == 255
    assert np.array_equal(binarise_mask(one, 20, "eq1"), nearest)
    assert not load_mask(None, 9, "eq1").any() and load_mask(None, 9, "eq1").shape == (9, 9)
    with pytest.raises(ValueError):
        binarise_mask(m, 8, "gt1")


# ------------------------------------------------------------------------------------------------
# preprocessing parity


@pytest.fixture(scope="module")
def odd_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8))


def test_preprocess_bilinear_matches_torchvision(odd_image):
    pp = IMAGENET_PREPROCESS
    ref = T.Compose([T.Resize((48, 48)), T.CenterCrop(48), T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    out = preprocess_image(odd_image, 48, pp)
    assert out.dtype == torch.float32 and out.shape == (3, 48, 48)
    assert torch.equal(out, ref(odd_image.convert("RGB")))


def test_preprocess_bicubic_matches_clip_transform(odd_image):
    pp = CLIP_PREPROCESS
    # open_clip preprocess_val: Resize((S, S), BICUBIC), CenterCrop, RGB, ToTensor, Normalize
    ref = T.Compose([
        T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop((64, 64)),
        lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(pp.mean, pp.std),
    ])
    gray = odd_image.convert("L")
    for img in (odd_image, gray):
        assert torch.equal(preprocess_image(img, 64, pp), ref(img.convert("RGB")))
    # bicubic really differs from bilinear here (the interpolation name is honoured)
    bilinear = dataclasses.replace(pp, interpolation="bilinear")
    assert not torch.equal(preprocess_image(odd_image, 64, pp), preprocess_image(odd_image, 64, bilinear))


# ------------------------------------------------------------------------------------------------
# parallel decoding


def test_load_images_workers_equal_serial(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    serial = load_images(paths, 32, CLIP_PREPROCESS, num_workers=0, progress=False, batch_size=3)
    workers = load_images(paths, 32, CLIP_PREPROCESS, num_workers=2, progress=False, batch_size=3)
    assert serial.shape == (7, 3, 32, 32) and serial.dtype == torch.float32
    assert torch.equal(serial, workers)
    for i, p in enumerate(paths):  # order = path order
        with Image.open(p) as im:
            assert torch.equal(serial[i], preprocess_image(im, 32, CLIP_PREPROCESS))


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_dataset_error(tmp_path, workers):
    good = _png(tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    _raises(bad, lambda: load_images([good, bad], 16, IMAGENET_PREPROCESS, num_workers=workers,
                                     progress=False))


def test_load_masks_order_and_none(tmp_path):
    a = np.zeros((10, 10), np.uint8)
    a[:5] = 255
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(255 - a).save(tmp_path / "b.png")
    paths = [tmp_path / "a.png", None, tmp_path / "b.png"]
    masks = load_masks(paths, 10, "eq1", num_workers=0, progress=False)
    assert masks.dtype == torch.bool and masks.shape == (3, 10, 10)
    assert masks[0, :5].all() and not masks[0, 5:].any() and not masks[1].any() and masks[2, 5:].all()
    same = load_masks(paths, 10, "eq1", num_workers=2, progress=False)
    assert torch.equal(masks, same)


# ------------------------------------------------------------------------------------------------
# readers on fake trees and their errors


def test_mvtec_fake_tree_and_category_listing(tmp_path):
    _mvtec_tree(tmp_path, "cable")
    _mvtec_tree(tmp_path, "zipper")
    _mvtec_tree(tmp_path, "not_mvtec")  # other folders with the layout are read too, with a note (issue 10)
    (tmp_path / "docs").mkdir()  # a folder without test/ is not a category
    assert list_categories("mvtec", tmp_path) == ["cable", "not_mvtec", "zipper"]
    assert "not one of the 15 official" in load_category("mvtec", tmp_path, "not_mvtec").notes[0]
    cat = load_category("mvtec", tmp_path, "cable")
    assert cat.notes == []
    assert cat.defect_types == ["crack"] * 3 + ["good"] * 3 + ["scratch"] * 3
    assert cat.labels == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    masks = ["000_mask.png", "001_mask.png", "002_mask.png"]
    assert [m.name if m else None for m in cat.mask_paths] == masks + [None] * 3 + masks


def test_missing_mask(tmp_path):
    cat_dir = _mvtec_tree(tmp_path)
    (cat_dir / "ground_truth" / "scratch" / "001_mask.png").unlink()
    _raises(cat_dir / "test" / "scratch" / "001.png", load_category, "mvtec", tmp_path, "bottle")


def test_extra_mask(tmp_path):
    cat_dir = _mvtec_tree(tmp_path)
    extra = _png(cat_dir / "ground_truth" / "crack" / "007_mask.png", 255, mode="L")
    _raises(extra, load_category, "mvtec", tmp_path, "bottle")


def test_mask_count_mismatch_by_name(tmp_path):
    # Same count, wrong names: sorted-position pairing would silently accept this.
    cat_dir = _mvtec_tree(tmp_path)
    gt = cat_dir / "ground_truth" / "crack"
    (gt / "002_mask.png").rename(gt / "009_mask.png")
    _raises(cat_dir / "test" / "crack" / "002.png", load_category, "mvtec", tmp_path, "bottle")


def test_missing_mask_folder_and_orphan_mask_folder(tmp_path):
    cat_dir = _mvtec_tree(tmp_path)
    for f in (cat_dir / "ground_truth" / "crack").iterdir():
        f.unlink()
    (cat_dir / "ground_truth" / "crack").rmdir()
    _raises(cat_dir / "ground_truth" / "crack", load_category, "mvtec", tmp_path, "bottle")
    other = _mvtec_tree(tmp_path / "b")
    _png(other / "ground_truth" / "dent" / "000_mask.png", 255, mode="L")
    _raises(other / "ground_truth" / "dent", load_category, "mvtec", tmp_path / "b", "bottle")


def test_no_ground_truth_means_no_masks(tmp_path):
    _mvtec_tree(tmp_path)
    shutil.rmtree(tmp_path / "bottle" / "ground_truth")
    cat = load_category("mvtec", tmp_path, "bottle")
    assert not cat.has_masks and all(m is None for m in cat.mask_paths) and sum(cat.labels) == 6


def test_empty_category_missing_root_bad_name(tmp_path):
    (tmp_path / "bottle" / "test" / "good").mkdir(parents=True)
    (tmp_path / "bottle" / "test" / "good" / "notes.txt").write_text("not an image")
    _raises(tmp_path / "bottle" / "test", load_category, "mvtec", tmp_path, "bottle")
    _raises(tmp_path / "nowhere", load_category, "mvtec", tmp_path / "nowhere", "bottle")
    _raises(tmp_path / "nowhere", list_categories, "mvtec", tmp_path / "nowhere")
    _raises(tmp_path / "cable", load_category, "mvtec", tmp_path, "cable")
    _raises(tmp_path / "empty", list_categories, "btad", (tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(DatasetError, match="valid datasets: .*mvtec.*visa"):
        load_category("imagenet", tmp_path, "bottle")
    assert {"mvtec", "btad", "visa", "mvtec3d", "folder", "synthetic"} <= set(available())


def test_btad_fake_tree(tmp_path):
    # BTAD: normal "ok", defects "ko", masks keep the image stem (0000.bmp <-> 0000.png)
    for i in range(3):
        _png(tmp_path / "02" / "test" / "ok" / f"{i:04d}.bmp")
        _png(tmp_path / "02" / "test" / "ko" / f"{i:04d}.bmp")
        _png(tmp_path / "02" / "ground_truth" / "ko" / f"{i:04d}.png", 255, mode="L")
    _png(tmp_path / "01" / "test" / "ok" / "0000.png")
    assert list_categories("btad", tmp_path) == ["01", "02"]
    cat = load_category("btad", tmp_path, "02")
    assert cat.defect_types == ["ko"] * 3 + ["ok"] * 3 and cat.labels == [1, 1, 1, 0, 0, 0]
    assert [m.name for m in cat.mask_paths[:3]] == ["0000.png", "0001.png", "0002.png"]
    assert cat.mask_rule == "eq1" and cat.has_masks is True
    # a stem and a stem_mask file for the same image is ambiguous
    _png(tmp_path / "02" / "ground_truth" / "ko" / "0001_mask.png", 255, mode="L")
    _raises(tmp_path / "02" / "test" / "ko" / "0001.bmp", load_category, "btad", tmp_path, "02")


def test_mvtec3d_fake_tree(tmp_path):
    for t in ("good", "hole", "crack"):
        for i in range(2):
            _png(tmp_path / "bagel" / "test" / t / "rgb" / f"{i:03d}.png")
            _png(tmp_path / "bagel" / "test" / t / "gt" / f"{i:03d}.png", 255 if t != "good" else 0, mode="L")
            (tmp_path / "bagel" / "test" / t / "xyz").mkdir(exist_ok=True)
    assert list_categories("mvtec3d", tmp_path) == ["bagel"]
    cat = load_category("mvtec3d", tmp_path, "bagel")
    assert cat.defect_types == ["crack", "crack", "good", "good", "hole", "hole"]
    assert cat.labels == [1, 1, 0, 0, 1, 1] and cat.has_masks
    assert cat.mask_paths[2] is None and cat.mask_paths[4] == tmp_path / "bagel/test/hole/gt/000.png"
    assert all(p.parent.name == "rgb" for p in cat.paths)
    (tmp_path / "bagel/test/hole/gt/001.png").unlink()
    _raises(tmp_path / "bagel/test/hole/rgb/001.png", load_category, "mvtec3d", tmp_path, "bagel")


VISA_CSV = """object,split,label,image,mask
candle,train,normal,candle/Data/Images/Normal/0100.JPG,
candle,test,anomaly,candle/Data/Images/Anomaly/002.JPG,candle/Data/Masks/Anomaly/002.png
candle,test,normal,candle/Data/Images/Normal/0007.JPG,
pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png
candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,candle/Data/Masks/Anomaly/001.png
candle,test,normal,candle/Data/Images/Normal/0003.JPG,
"""


def _visa_tree(root: Path, text: str = VISA_CSV) -> None:
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text(text)
    for line in text.splitlines()[1:]:
        _, _, _, img, mask = line.split(",")
        _png(root / img)
        if mask:
            _png(root / mask, 255, mode="L")


def test_visa_csv_order(tmp_path):
    _visa_tree(tmp_path)
    assert list_categories("visa", tmp_path) == ["candle", "pcb1"]
    cat = load_category("visa", tmp_path, "candle")
    # test rows of the object, in csv order (not sorted), train rows dropped
    assert [p.name for p in cat.paths] == ["002.JPG", "0007.JPG", "001.JPG", "0003.JPG"]
    assert cat.labels == [1, 0, 1, 0]
    assert cat.defect_types == ["Anomaly", "Normal", "Anomaly", "Normal"]
    assert cat.mask_paths[0] == tmp_path / "candle/Data/Masks/Anomaly/002.png"
    assert cat.mask_paths[1] is None and cat.mask_rule == "gt0" and cat.dataset == "visa"


def test_visa_csv_errors(tmp_path):
    _visa_tree(tmp_path / "a", VISA_CSV.replace("test,normal,candle/Data/Images/Normal/0007",
                                                "test,odd,candle/Data/Images/Normal/0007"))
    _raises(tmp_path / "a" / "split_csv" / "1cls.csv", load_category, "visa", tmp_path / "a", "candle")
    _visa_tree(tmp_path / "b")
    (tmp_path / "b" / "candle/Data/Images/Normal/0003.JPG").unlink()
    missing = tmp_path / "b" / "candle/Data/Images/Normal/0003.JPG"
    _raises(missing, load_category, "visa", tmp_path / "b", "candle")
    _raises(tmp_path / "b" / "split_csv" / "1cls.csv", load_category, "visa", tmp_path / "b", "fryum")


def test_visa_converted_layout(tmp_path):
    conv = tmp_path / "visa_pytorch" / "1cls"
    _mvtec_tree(conv, "pcb2", defects=("bad",), mask_name=lambda stem: f"{stem}.png", img_ext=".JPG")
    assert list_categories("visa", tmp_path) == ["pcb2"]
    cat = load_category("visa", tmp_path, "pcb2")
    assert cat.defect_types == ["bad"] * 3 + ["good"] * 3 and cat.mask_rule == "gt0"
    assert cat.mask_paths[0] == conv / "pcb2/ground_truth/bad/000.png"
    assert load_category("visa", conv, "pcb2").paths == cat.paths


def test_folder_unlabeled(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.tiff"):
        _png(tmp_path / "line1" / name) if not name.endswith("tiff") else Image.new("RGB", (4, 4)).save(
            tmp_path / "line1" / name)
    (tmp_path / "line1" / "readme.txt").write_text("x")
    assert list_categories("folder", tmp_path) == ["line1"]
    cat = load_category("folder", tmp_path, "line1")
    assert [p.name for p in cat.paths] == ["a.PNG", "b.jpg", "c.tiff"]
    assert cat.has_labels is False and cat.has_masks is False
    assert cat.labels == [UNLABELED] * 3 and all(m is None for m in cat.mask_paths)
    # the root itself can be the plain folder
    assert list_categories("folder", tmp_path / "line1") == ["line1"]
    assert load_category("folder", tmp_path / "line1", "line1").paths == cat.paths


def test_folder_mvtec_style_with_ok_and_suffixless_masks(tmp_path):
    _mvtec_tree(tmp_path, "part", defects=("dent",), good="OK", mask_name=lambda s: f"{s}.png")
    cat = load_category("folder", tmp_path, "part")
    assert cat.defect_types == ["OK"] * 3 + ["dent"] * 3  # code-point order, as sorted() gives
    assert cat.labels == [0, 0, 0, 1, 1, 1] and cat.has_labels and cat.has_masks
    assert cat.mask_paths[3] == tmp_path / "part/ground_truth/dent/000.png"


# ------------------------------------------------------------------------------------------------
# divide_num (SPEC 7.4)


def _original_split(paths: list[str], divide_num: int, t: int, seed: int) -> list[int]:
    # A literal transcription of SPEC 7.4 with the global RNG, as the original runs it per subset.
    random.seed(seed)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(p.split("/")[-2], []).append(i)
    out = []
    for ids in groups.values():
        random.shuffle(ids)
        chunks = [ids[i:i + divide_num] for i in range(0, len(ids), divide_num)]
        out.extend(c[t] for c in chunks if len(c) > t)
    return out


def test_divide_hand_worked_example():
    # groups in order of first appearance: "crack" (indices 0,1,2,3,4) then "good" (5,6,7)
    paths = [f"/d/cat/test/crack/{i}.png" for i in range(5)] + [f"/d/cat/test/good/{i}.png" for i in range(3)]
    random.seed(42)
    crack = [0, 1, 2, 3, 4]
    random.shuffle(crack)
    good = [5, 6, 7]
    random.shuffle(good)  # the RNG runs on from the first group
    # divide_num = 2: chunks crack -> [c0,c1],[c2,c3],[c4]; good -> [g0,g1],[g2]
    expected = [
        [crack[0], crack[2], crack[4], good[0], good[2]],
        [crack[1], crack[3], good[1]],
    ]
    assert divide_indices(paths, 2, seed=42) == expected
    assert [_original_split(paths, 2, t, 42) for t in range(2)] == expected


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    divide_num=st.integers(1, 5),
    seed=st.integers(0, 1000),
    interleave=st.booleans(),
)
def test_divide_properties(sizes, divide_num, seed, interleave):
    paths = [f"root/t{g}/{i}.png" for g, n in enumerate(sizes) for i in range(n)]
    if interleave:  # VisA csv order mixes groups; groups still go by first appearance
        paths = paths[::2] + paths[1::2]
    state = random.getstate()
    subsets = divide_indices(paths, divide_num, seed=seed)
    assert random.getstate() == state  # the global RNG is left alone
    assert len(subsets) == divide_num
    flat = [i for s in subsets for i in s]
    assert sorted(flat) == list(range(len(paths)))  # disjoint and covering
    assert subsets == divide_indices(paths, divide_num, seed=seed)  # deterministic
    if divide_num == 1:
        assert subsets == [list(range(len(paths)))]  # identity
        return
    assert subsets == [_original_split(paths, divide_num, t, seed) for t in range(divide_num)]
    for g, n in enumerate(sizes):  # stratified: each subset gets its share of every group
        per = [sum(paths[i].split("/")[1] == f"t{g}" for i in s) for s in subsets]
        assert max(per) - min(per) <= 1 and sum(per) == n
        assert per == sorted(per, reverse=True)  # earlier subsets take the remainders


def test_divide_on_samples_uses_defect_type():
    # MVTec 3D-AD: every image sits in an "rgb" folder; samples stratify on the type instead.
    samples = [Sample(Path(f"/c/test/{t}/rgb/{i}.png"), int(t != "good"), t)
               for t in ("good", "hole") for i in range(4)]
    subsets = divide_indices(samples, 2)
    assert all(sum(samples[i].defect_type == "hole" for i in s) == 2 for s in subsets)
    with pytest.raises(ValueError):
        divide_indices(samples, 0)


# ------------------------------------------------------------------------------------------------
# synthetic set


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic_and_readable(tmp_path):
    kw = dict(n_good=2, n_defect=3, n_train=1, size=96, seed=3)
    a = _tree_bytes(generate_synthetic(tmp_path / "a", **kw))
    b = _tree_bytes(generate_synthetic(tmp_path / "b", **kw))
    assert a == b and len(a) == 2 * (2 + 3 + 1 + 3)
    c = _tree_bytes(generate_synthetic(tmp_path / "c", **{**kw, "seed": 4}))
    assert c.keys() == a.keys() and c != a
    assert list_categories("synthetic", tmp_path / "a") == ["object", "texture"]
    cat = load_category("synthetic", tmp_path / "a", "object")
    assert len(cat) == 5 and sum(cat.labels) == 3 and cat.has_masks
    assert sorted(set(cat.defect_types) - {"good"}) == sorted(DEFECT_TYPES["object"])
    # a renamed test/Good stays normal, as in the mvtec reader (NORMAL_TYPES, any case)
    (tmp_path / "a" / "object" / "test" / "good").rename(tmp_path / "a" / "object" / "test" / "Good")
    renamed = load_category("synthetic", tmp_path / "a", "object")
    assert sorted(zip(renamed.labels, renamed.defect_types)) == sorted(
        (label, "Good" if t == "good" else t) for label, t in zip(cat.labels, cat.defect_types))


@pytest.mark.parametrize("category", ["texture", "object"])
def test_synthetic_masks_match_defects(category, tmp_path):
    size = 128
    for defect in DEFECT_TYPES[category]:
        for idx in range(2):
            clean, img, mask = make_image(category, defect, seed=0, index=idx, size=size)
            changed = np.any(clean != img, axis=-1)
            assert not (changed & ~mask).any()  # nothing outside the mask changed
            assert changed[mask].mean() > 0.8  # and the mask is (nearly all) changed
            assert 0.002 < mask.mean() < 0.06  # realistic area
    clean, img, mask = make_image(category, None, seed=0, index=0, size=size)
    assert np.array_equal(clean, img) and not mask.any()
    # the written mask file is the defect's mask
    root = generate_synthetic(tmp_path, categories=(category,), n_good=1, n_defect=1, n_train=0, size=size)
    t = DEFECT_TYPES[category][0]
    written = np.asarray(Image.open(root / category / "ground_truth" / t / "000_mask.png")) > 0
    assert np.array_equal(written, make_image(category, t, seed=0, index=0, size=size)[2])
