"""The user's own images, in one of two layouts.

1. MVTec-style: ``<root>/<cat>/test/<type>/*`` (+ optional ``<root>/<cat>/ground_truth/<type>/``
   with ``<stem>_mask.*`` or ``<stem>.*`` masks). A type named good, ok or normal (any case) is
   normal, any other type is defective. Masks use the MVTec "eq1" rule; for soft or small masks
   ``dataclasses.replace(category, mask_rule="gt0")`` switches to VisA's rule.
2. Unlabeled: a plain folder of images, ``<root>/<cat>/*`` (category = sub-folder), or ``<root>/*``
   itself (category = ``<root>``'s folder name). Every sample has ``label == UNLABELED`` (-1) and
   ``mask_path`` None, and the category has ``has_labels=False`` and ``has_masks=False``: the
   pipeline can only produce scores and maps, not metrics.
"""
from __future__ import annotations

from pathlib import Path

from .base import (
    NORMAL_TYPES,  # noqa: F401 - re-exported (viz imports it from here)
    UNLABELED,
    Category,
    DatasetError,
    Sample,
    is_image,
    is_normal_type,
    list_images,
    list_subdirs,
)
from .registry import Reader, register_reader
from .tree import read_mvtec_tree


def _has_images(folder: Path) -> bool:
    return any(is_image(p) for p in folder.iterdir())


@register_reader("folder")
class FolderReader(Reader):
    layout = "<root>/<category>/test/<type>/* or a folder of images"

    def categories(self, root: Path) -> list[str]:
        names = [d for d in list_subdirs(root) if (root / d / "test").is_dir() or _has_images(root / d)]
        if not names and _has_images(root):
            return [root.name]
        return names

    def load(self, root: Path, category: str) -> Category:
        cat_dir = root / category
        if not cat_dir.is_dir() and category == root.name and _has_images(root):
            cat_dir = root
        if not cat_dir.is_dir():
            raise DatasetError(f"{cat_dir}: folder category {category!r} not found (expected a folder)")
        left_out: dict[Path, str] = {}
        if (cat_dir / "test").is_dir():
            samples, has_masks = read_mvtec_tree(
                cat_dir, is_normal=is_normal_type, mask_suffixes=("_mask", ""), left_out=left_out
            )
            return Category(category, cat_dir, self.name, samples, has_masks, "eq1", left_out=left_out)
        images = list_images(cat_dir, left_out)
        if not images:
            raise DatasetError(f"{cat_dir}: no images found (expected test/<type>/ folders or image files)")
        samples = [Sample(p, UNLABELED, p.parent.name, None) for p in images]
        return Category(category, cat_dir, self.name, samples, has_masks=False, has_labels=False, left_out=left_out)
