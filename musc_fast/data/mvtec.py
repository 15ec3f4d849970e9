"""MVTec AD reader (SPEC 7.1): ``<root>/<cat>/test/<type>/*.png``, masks
``<root>/<cat>/ground_truth/<type>/<stem>_mask.png``; "good" is normal; masks binarised by "eq1".

Categories: every sub-folder of the root that has a ``test/`` folder. The 15 official names are the
usual ones; any other folder with the layout is read too, with a note (``Category.notes``) that it is
not an official name (so that "all" never skips a category without a word). Normal folders are
recognised by ``is_normal_type`` (good/ok/normal, any case: ``test/Good`` is normal).
"""
from __future__ import annotations

from pathlib import Path

from .base import Category, is_normal_type, list_subdirs, require_dir
from .registry import Reader, register_reader
from .tree import read_mvtec_tree

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


@register_reader("mvtec", "mvtec_ad")
class MVTecReader(Reader):
    layout = "<root>/<category>/test/<type>/*.png (the 15 MVTec AD category names, or others with that layout)"
    normal_type = "good"
    mask_suffixes: tuple[str, ...] = ("_mask",)
    mask_rule = "eq1"
    known: tuple[str, ...] = MVTEC_CATEGORIES

    def categories(self, root: Path) -> list[str]:
        return [d for d in list_subdirs(root) if (root / d / "test").is_dir()]

    def load(self, root: Path, category: str) -> Category:
        cat_dir = require_dir(root / category, f"{self.name} category {category!r}")
        left_out: dict[Path, str] = {}
        samples, has_masks = read_mvtec_tree(
            cat_dir, is_normal=is_normal_type, mask_suffixes=self.mask_suffixes, left_out=left_out
        )
        notes = []
        if category not in self.known:
            notes.append(f"category {category!r} is not one of the {len(self.known)} official {self.name} names "
                         f"({', '.join(self.known[:3])}, ...); read with the same layout")
        return Category(category, cat_dir, self.name, samples, has_masks, self.mask_rule, left_out=left_out,
                        notes=notes)
