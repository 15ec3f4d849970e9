"""What every reader returns (``Sample``, ``Category``), its error type, and file-listing helpers.

A reader only lists files: it never decodes pixels. Decoding lives in ``transforms.py`` and
``loading.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

# Accepted image suffixes, compared lower-cased (".PNG", ".JPG" are fine). GIF: the first frame is read.
# Other files in an image folder are not read and are listed in ``Category.left_out``.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

# Test-folder names that mean "normal" in every MVTec-style reader, compared case-insensitively
# ("good", "Good", "OK", ...); any other type folder is defective.
NORMAL_TYPES: frozenset[str] = frozenset({"good", "ok", "normal"})

# Mask binarisation rules after the bilinear resize (SPEC 7): "eq1" keeps only pixels that are
# exactly 1.0 (the original's int cast, MVTec/BTAD), "gt0" keeps every pixel > 0 (VisA).
MASK_RULES: tuple[str, ...] = ("eq1", "gt0")

# Label of an image whose normal/defective status is unknown (a plain folder of images).
UNLABELED = -1


class DatasetError(ValueError):
    """A data set on disk is missing, empty or inconsistent. The message is one line naming the path
    and what was expected (the CLI prints it and exits with status 2)."""


class UnreadableImageError(DatasetError):
    """An image file cannot be decoded (missing, truncated, not an image, no permission). The runner
    skips such files with a warning unless ``--strict``; the message names the file."""


def check_category_name(name: str) -> str:
    """``name`` if it is one plain folder name; a DatasetError for names that would leave the data root
    ("..", "a/b", absolute paths): categories are sub-folders, never paths."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DatasetError(f"category {name!r}: expected a folder name inside the data set root, not a path")
    return name


@dataclass(frozen=True)
class Sample:
    """One test image.

    Attributes:
        path: the image file.
        label: 1 defective, 0 normal, ``UNLABELED`` (-1) when unknown.
        defect_type: the image's folder name as the original uses it ("good", "crack", "ok", "ko";
            VisA raw: "Normal"/"Anomaly"); ``divide_indices`` stratifies on it.
        mask_path: the ground-truth mask, or None for an all-zero mask (normal images, data sets
            without masks).
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass
class Category:
    """The test split of one category, in the original's image order (SPEC 7).

    Attributes:
        name: category name ("bottle", "01", "candle", ...).
        root: the category's folder.
        dataset: registry name of the reader that built it ("mvtec", "visa", ...).
        samples: the images in order.
        has_masks: False when the data set has no ground truth at all (pixel metrics impossible).
        mask_rule: "eq1" or "gt0", see ``MASK_RULES``.
        has_labels: False for a plain folder of images: every ``label`` is ``UNLABELED`` and only
            scores and maps can be produced (no metrics).
        left_out: files found in the image folders that are not read, -> why (e.g. an unsupported
            suffix); see ``input_notes``.
        notes: the reader's remarks on how it read the category (e.g. a folder that is not an official
            category name of the data set); see ``input_notes``.
    """

    name: str
    root: Path
    dataset: str
    samples: list[Sample] = field(default_factory=list)
    has_masks: bool = False
    mask_rule: str = "eq1"
    has_labels: bool = True
    left_out: dict[Path, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {', '.join(MASK_RULES)}, got {self.mask_rule!r}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    @property
    def labels(self) -> list[int]:
        """Per-image labels; all ``UNLABELED`` when ``has_labels`` is False."""
        return [s.label for s in self.samples]

    @property
    def mask_paths(self) -> list[Path | None]:
        return [s.mask_path for s in self.samples]

    @property
    def defect_types(self) -> list[str]:
        return [s.defect_type for s in self.samples]


    def input_notes(self, examples: int = 3) -> list[str]:
        """One-line remarks for the user: ``notes``, then one line summing up ``left_out`` (counts per
        reason, the first few files)."""
        lines = list(self.notes)
        if self.left_out:
            counts: dict[str, int] = {}
            for why in self.left_out.values():
                counts[why] = counts.get(why, 0) + 1
            first = ", ".join(str(p) for p in list(self.left_out)[:examples])
            more = ", ..." if len(self.left_out) > examples else ""
            lines.append(f"category {self.name!r}: {len(self.left_out)} file(s) not read: "
                         + "; ".join(f"{n} {why}" for why, n in counts.items()) + f" (e.g. {first}{more})")
        return lines


def is_normal_type(name: str) -> bool:
    """Whether a test-folder name means normal images (``NORMAL_TYPES``, any case)."""
    return name.lower() in NORMAL_TYPES


def is_image(path: Path) -> bool:
    """A regular, non-hidden file with an accepted image suffix."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, left_out: dict[Path, str] | None = None) -> list[Path]:
    """Image files directly inside ``folder``, sorted by file name (the original's ``sorted(listdir)``).

    ``left_out``, when given, receives the other non-hidden regular files of ``folder`` -> why they
    are not read (their suffix is not in ``IMAGE_EXTENSIONS``)."""
    images = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_image(p):
            images.append(p)
        elif left_out is not None and not p.name.startswith(".") and p.is_file():
            left_out[p] = f"with suffix {p.suffix.lower() or '(none)'} (not a supported image type)"
    return images


def list_subdirs(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError saying what was expected there."""
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} not found (expected a folder)")
    return path


def existing(root: Path, names: Iterable[str], marker: str) -> list[str]:
    """The ``names`` (sorted) for which ``root/name/marker`` exists: e.g. known categories on disk."""
    return sorted(n for n in names if (root / n / marker).exists())
