"""MVTec 3D-AD reader, RGB only: ``<root>/<cat>/test/<type>/rgb/*.png``, masks
``<root>/<cat>/test/<type>/gt/<same name>``; "good" is normal (its all-zero gt files are not read).

Not supported by the original MuSc; masks use the MVTec "eq1" rule. ``defect_type`` is the type
folder (not the parent "rgb" folder), so ``divide_indices`` stays stratified.
"""
from __future__ import annotations

from pathlib import Path

from .base import Category, DatasetError, Sample, existing, is_normal_type, list_images, list_subdirs, require_dir
from .registry import Reader, register_reader
from .tree import pair_masks

MVTEC3D_CATEGORIES: tuple[str, ...] = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire",
)


@register_reader("mvtec3d")
class MVTec3DReader(Reader):
    layout = "<root>/<category>/test/<type>/rgb/*.png with MVTec 3D-AD category names"

    def categories(self, root: Path) -> list[str]:
        return existing(root, MVTEC3D_CATEGORIES, "test")

    def load(self, root: Path, category: str) -> Category:
        cat_dir = require_dir(root / category, f"mvtec3d category {category!r}")
        test_dir = require_dir(cat_dir / "test", "test split")
        types = list_subdirs(test_dir)
        defect_types = [t for t in types if not is_normal_type(t)]
        # Masks exist when any defect type has a gt folder; then every defect type needs one.
        has_masks = any((test_dir / t / "gt").is_dir() for t in defect_types)
        samples: list[Sample] = []
        left_out: dict[Path, str] = {}
        for t in types:
            images = list_images(require_dir(test_dir / t / "rgb", f"rgb images of test/{t}"), left_out)
            if is_normal_type(t):
                samples.extend(Sample(p, 0, t, None) for p in images)
                continue
            masks: list[Path | None] = [None] * len(images)
            if has_masks and images:
                mask_dir = require_dir(test_dir / t / "gt", f"masks of test/{t}")
                masks = list(pair_masks(images, mask_dir, ("",)))
            samples.extend(Sample(p, 1, t, m) for p, m in zip(images, masks, strict=True))
        if not samples:
            raise DatasetError(f"{test_dir}: no images found (expected png files in test/<type>/rgb/)")
        return Category(category, cat_dir, self.name, samples, has_masks, "eq1", left_out=left_out)
