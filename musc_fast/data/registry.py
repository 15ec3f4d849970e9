"""Data-set registry: name -> reader class, and the two entry points ``list_categories`` and
``load_category``.

A reader is a class with ``categories(root) -> list[str]`` and ``load(root, category) -> Category``;
``@register_reader("name", ...)`` adds it. Readers see an existing root folder (checked here). The
built-in readers are imported (so registered) by ``musc_fast.data``'s ``__init__``, which Python runs
before this module is reachable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

from .base import Category, DatasetError, check_category_name


class Reader:
    """Base class of the data-set readers (test split only)."""

    name: ClassVar[str] = ""
    # Shown when a root holds no category of this data set.
    layout: ClassVar[str] = ""

    def categories(self, root: Path) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, root: Path, category: str) -> Category:  # pragma: no cover - abstract
        raise NotImplementedError


READERS: dict[str, type[Reader]] = {}


def register_reader(*names: str) -> Callable[[type[Reader]], type[Reader]]:
    """Class decorator: register a reader under each of ``names`` (the first is its canonical name)."""

    def deco(cls: type[Reader]) -> type[Reader]:
        for n in names:
            if n in READERS:
                raise ValueError(f"data set {n!r} registered twice")
            READERS[n] = cls
        cls.name = names[0]
        return cls

    return deco


def available() -> list[str]:
    """Registered data-set names (aliases included)."""
    return sorted(READERS)


def get_reader(dataset: str) -> Reader:
    if dataset not in READERS:
        raise DatasetError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(sorted(READERS))}")
    return READERS[dataset]()


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found (expected a folder)")
    return root


def list_categories(dataset: str, root: str | Path) -> list[str]:
    """The categories of ``dataset`` present under ``root``, sorted. Raises DatasetError if none."""
    reader = get_reader(dataset)
    root = _check_root(root)
    names = reader.categories(root)
    if not names:
        raise DatasetError(f"{root}: no {reader.name} categories found (expected {reader.layout})")
    return names


def load_category(dataset: str, root: str | Path, category: str) -> Category:
    """The test split of one category of ``dataset`` under ``root`` (see ``Category``)."""
    reader = get_reader(dataset)
    return reader.load(_check_root(root), check_category_name(category))
