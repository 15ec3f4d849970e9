"""The original's ``divide_num`` split into stratified subsets (SPEC 7.4).

For subset t (one fresh dataset object per subset in the original): seed Python's RNG with ``seed``;
group the image indices by the image's folder name, groups in order of first appearance; for each
group in turn, ``shuffle`` its index list (the RNG state runs on from group to group), cut it into
consecutive chunks of ``divide_num`` and take element t of every chunk long enough to have one.
Subset t is the concatenation over groups. Because the seed is reset for every subset, all subsets
see the same shuffles, so they are disjoint and together cover every image.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from .base import Sample


def _group_key(item: Sample | str | Path) -> str:
    # The original groups on path.split('/')[-2], the parent folder name. A Sample's defect_type is
    # that name for MVTec/BTAD/VisA/folder data, and the type folder (not "rgb") for MVTec 3D-AD.
    if isinstance(item, Sample):
        return item.defect_type
    return Path(item).parent.name


def _subset(groups: list[list[int]], divide_num: int, t: int, seed: int) -> list[int]:
    # A private Random(seed) shuffles exactly like random.seed(seed) + random.shuffle, without
    # touching the global RNG the original reseeds.
    rng = random.Random(seed)
    out: list[int] = []
    for members in groups:
        order = list(members)
        rng.shuffle(order)
        chunks = [order[i:i + divide_num] for i in range(0, len(order), divide_num)]
        out.extend(chunk[t] for chunk in chunks if len(chunk) > t)
    return out


def divide_indices(
    samples_or_paths: Sequence[Sample | str | Path], divide_num: int, seed: int = 42
) -> list[list[int]]:
    """Indices of the ``divide_num`` subsets, each in the original's order (SPEC 7.4).

    ``divide_num == 1`` gives one subset in the original order (the original skips the split then).
    Subsets can be empty when ``divide_num`` exceeds the image count.
    """
    if int(divide_num) != divide_num or divide_num < 1:
        raise ValueError(f"divide_num must be a positive integer, got {divide_num!r}")
    n = len(samples_or_paths)
    if divide_num == 1:
        return [list(range(n))]
    groups: dict[str, list[int]] = {}  # dicts keep insertion order = order of first appearance
    for i, item in enumerate(samples_or_paths):
        groups.setdefault(_group_key(item), []).append(i)
    members = list(groups.values())
    return [_subset(members, divide_num, t, seed) for t in range(divide_num)]
