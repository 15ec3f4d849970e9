"""VisA reader (SPEC 7.2), from the raw download or its MVTec-like conversion.

Raw download (what the original uses, through its ``meta.json``): ``<root>/split_csv/1cls.csv`` with
columns object, split, label, image, mask (paths relative to ``<root>``). The test rows of one object
are read in csv order; label "normal" -> 0, "anomaly" -> 1; ``defect_type`` is the image's folder
("Normal"/"Anomaly"), which is what the original's ``divide_num`` split groups on. Normal images get
no mask even if the csv names one (as the original's preprocessing does).

Converted layout (``visa_pytorch/1cls``, e.g. from the VisA authors' ``prepare_data.py``):
``<root>/<cat>/test/{good,bad}/*.JPG``, masks ``<root>/<cat>/ground_truth/bad/<stem>.png``; accepted
when ``<root>`` is that folder or contains ``visa_pytorch/1cls``. Its order is the sorted MVTec order,
not the csv order. Both layouts binarise masks with "gt0" (after ``convert('L')``).
"""
from __future__ import annotations

import csv
from pathlib import Path

from .base import Category, DatasetError, Sample, existing, is_normal_type, require_dir
from .registry import Reader, register_reader
from .tree import read_mvtec_tree

VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
_CSV = Path("split_csv") / "1cls.csv"
_CONVERTED = Path("visa_pytorch") / "1cls"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _read_csv(csv_path: Path) -> list[dict[str, str]]:
    """The csv rows as dicts keyed by the five expected column names."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path}: missing column(s) {', '.join(missing)} (expected {', '.join(_COLUMNS)})"
            )
        idx = {c: header.index(c) for c in _COLUMNS}
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            rows.append({c: (row[i].strip() if i < len(row) else "") for c, i in idx.items()})
    return rows


@register_reader("visa")
class VisAReader(Reader):
    layout = "<root>/split_csv/1cls.csv (raw VisA) or <root>/<category>/test/{good,bad} (visa_pytorch/1cls)"

    @staticmethod
    def _converted_root(root: Path) -> Path | None:
        if (root / _CONVERTED).is_dir():
            return root / _CONVERTED
        if any((root / c / "test").is_dir() for c in VISA_CATEGORIES):
            return root
        return None

    def categories(self, root: Path) -> list[str]:
        if (root / _CSV).is_file():
            return sorted({r["object"] for r in _read_csv(root / _CSV) if r["split"] == "test"})
        conv = self._converted_root(root)
        return existing(conv, VISA_CATEGORIES, "test") if conv is not None else []

    def load(self, root: Path, category: str) -> Category:
        if (root / _CSV).is_file():
            return self._load_csv(root, category)
        conv = self._converted_root(root)
        if conv is None:
            raise DatasetError(
                f"{root / _CSV}: VisA split file not found (expected raw VisA or visa_pytorch/1cls)"
            )
        cat_dir = require_dir(conv / category, f"visa category {category!r}")
        left_out: dict[Path, str] = {}
        samples, has_masks = read_mvtec_tree(
            cat_dir, is_normal=is_normal_type, mask_suffixes=("", "_mask"), left_out=left_out
        )
        return Category(category, cat_dir, self.name, samples, has_masks, "gt0", left_out=left_out)

    def _load_csv(self, root: Path, category: str) -> Category:
        csv_path = root / _CSV
        rows = [r for r in _read_csv(csv_path) if r["object"] == category and r["split"] == "test"]
        if not rows:
            raise DatasetError(f"{csv_path}: no test rows for object {category!r}")
        samples: list[Sample] = []
        for r in rows:
            label = _LABELS.get(r["label"].lower())
            if label is None:
                raise DatasetError(
                    f"{csv_path}: label {r['label']!r} of {r['image']} is not 'normal' or 'anomaly'"
                )
            image = root / r["image"]
            if not image.is_file():
                raise DatasetError(f"{image}: image listed in {csv_path} not found")
            mask = None
            if label == 1:
                if not r["mask"]:
                    raise DatasetError(f"{image}: anomalous image without a mask path in {csv_path}")
                mask = root / r["mask"]
                if not mask.is_file():
                    raise DatasetError(f"{mask}: mask listed in {csv_path} not found")
            samples.append(Sample(image, label, image.parent.name, mask))
        return Category(category, root / category, self.name, samples, True, "gt0")
