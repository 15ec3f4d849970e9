"""Reading an MVTec-style tree: ``<cat>/test/<type>/*`` with masks in ``<cat>/ground_truth/<type>/``.

Shared by the MVTec AD, BTAD, VisA (converted), synthetic and user-folder readers. Order follows the
original (SPEC 7.1): type folders sorted by name, files sorted by name. Unlike the original, which
pairs the i-th sorted image with the i-th sorted mask, masks are paired by file name, and any
mismatch is an error instead of a silent mis-pairing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .base import IMAGE_EXTENSIONS, DatasetError, Sample, is_image, list_images, list_subdirs, require_dir

_EXT_HINT = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


def pair_masks(images: Sequence[Path], mask_dir: Path, suffixes: Sequence[str]) -> list[Path]:
    """The mask of each image, matched by name: image ``<stem>.<ext>`` pairs with the one mask file in
    ``mask_dir`` whose stem is ``<stem><suffix>`` for one of ``suffixes`` (any image extension).

    Raises DatasetError for a missing or ambiguous mask, a mask claimed twice, or masks left over.
    """
    by_stem: dict[str, Path] = {}
    for m in list_images(mask_dir):
        if m.stem in by_stem:
            other = by_stem[m.stem].name
            raise DatasetError(f"{m}: two masks share the stem {m.stem!r} (the other is {other})")
        by_stem[m.stem] = m
    used: set[Path] = set()
    out: list[Path] = []
    for img in images:
        found = [by_stem[img.stem + s] for s in suffixes if img.stem + s in by_stem]
        if not found:
            want = " or ".join(f"{img.stem}{s}.png" for s in suffixes)
            raise DatasetError(f"{img}: no mask found (expected {mask_dir / want})")
        if len(found) > 1:
            raise DatasetError(f"{img}: ambiguous masks {', '.join(str(f) for f in found)}")
        if found[0] in used:
            raise DatasetError(f"{img}: its mask {found[0]} is already paired with another image")
        used.add(found[0])
        out.append(found[0])
    extra = sorted(set(by_stem.values()) - used)
    if extra:
        raise DatasetError(
            f"{extra[0]}: mask without a matching image ({len(extra)} extra mask(s) in {mask_dir})"
        )
    return out


def read_mvtec_tree(
    cat_dir: Path,
    *,
    is_normal: Callable[[str], bool],
    mask_suffixes: Sequence[str],
    left_out: dict[Path, str] | None = None,
) -> tuple[list[Sample], bool]:
    """Samples of ``cat_dir/test`` in order, and whether a ``ground_truth`` folder exists.

    ``left_out``, when given, receives the files that are not read -> why: files of other types in
    the ``test/<type>/`` folders, and images lying directly in ``test/`` (outside any type folder).

    Without ``ground_truth`` every mask is None (``has_masks`` False, no error). With it, every
    defective type folder needs its mask folder, and mask folders without a test folder are errors.
    A ``ground_truth/<normal type>`` folder (all-zero masks in some conversions) is ignored.
    """
    test_dir = require_dir(cat_dir / "test", "test split")
    gt_dir = cat_dir / "ground_truth"
    has_masks = gt_dir.is_dir()
    types = list_subdirs(test_dir)
    samples: list[Sample] = []
    if left_out is not None:
        for p in sorted(test_dir.iterdir(), key=lambda p: p.name):
            if is_image(p):
                left_out[p] = "directly in test/ (images must be in a test/<type>/ folder)"
    for t in types:
        images = list_images(test_dir / t, left_out)
        if is_normal(t):
            samples.extend(Sample(p, 0, t, None) for p in images)
            continue
        masks: list[Path | None] = [None] * len(images)
        if has_masks and images:
            mask_dir = require_dir(gt_dir / t, f"masks of test/{t}")
            masks = list(pair_masks(images, mask_dir, mask_suffixes))
        samples.extend(Sample(p, 1, t, m) for p, m in zip(images, masks, strict=True))
    if has_masks:
        for g in list_subdirs(gt_dir):
            if g not in types and not is_normal(g):
                raise DatasetError(f"{gt_dir / g}: masks without a matching test/{g} folder")
    if not samples:
        raise DatasetError(f"{test_dir}: no images found (expected {_EXT_HINT} files in test/<type>/)")
    return samples, has_masks
