"""MVTec AD reader (SPEC 7.1): ``<root>/<cat>/test/<type>/*.png``, masks
``<root>/<cat>/ground_truth/<type>/<stem>_mask.png``; "good" is normal; masks binarised by "eq1"."""
from __future__ import annotations

from pathlib import Path

from .base import Category, existing, require_dir
from .registry import Reader, register_reader
from .tree import read_mvtec_tree

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


@register_reader("mvtec", "mvtec_ad")
class MVTecReader(Reader):
    layout = "<root>/<category>/test/<type>/*.png with one of the 15 MVTec AD category names"
    normal_type = "good"
    mask_suffixes: tuple[str, ...] = ("_mask",)
    mask_rule = "eq1"
    known: tuple[str, ...] = MVTEC_CATEGORIES

    def categories(self, root: Path) -> list[str]:
        return existing(root, self.known, "test")

    def load(self, root: Path, category: str) -> Category:
        cat_dir = require_dir(root / category, f"{self.name} category {category!r}")
        samples, has_masks = read_mvtec_tree(
            cat_dir, is_normal=lambda t: t == self.normal_type, mask_suffixes=self.mask_suffixes
        )
        return Category(category, cat_dir, self.name, samples, has_masks, self.mask_rule)
