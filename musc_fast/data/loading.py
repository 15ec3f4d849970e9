"""Decoding many files in worker processes, in a fixed order, with a progress bar.

A torch DataLoader over the file list (``shuffle=False``, so batches come back in order whatever the
worker count): worker processes decode and resize, batches travel through shared memory.
``num_workers=0`` decodes serially in this process and gives identical tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..backbones.base import Preprocess
from .base import MASK_RULES, DatasetError
from .transforms import INTERPOLATIONS, load_mask, preprocess_image


def default_num_workers() -> int:
    """min(4, CPU count): decoding scales little further and the rest of the pipeline needs cores."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Failure:
    # A decoding error, carried back as data: DataLoader would re-raise a worker's exception with a
    # multi-line traceback message, and the CLI wants the one-line DatasetError.
    message: str


class _Files(Dataset):
    """Item i = ``fn(paths[i])``, or a ``_Failure`` naming the file."""

    def __init__(self, paths: Sequence[str | Path | None], fn: Callable[[str | Path | None], torch.Tensor]):
        self.paths = list(paths)
        self.fn = fn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | _Failure:
        try:
            return self.fn(self.paths[i])
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for unreadable files
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return _Failure(f"{self.paths[i]}: cannot read file ({reason})")


def _collate(items: list) -> torch.Tensor | _Failure:
    for x in items:
        if isinstance(x, _Failure):
            return x
    return torch.stack(items)


class _DecodeImage:
    # A picklable callable (a lambda would not survive a spawn-started worker).
    def __init__(self, size: int, pp: Preprocess):
        self.size, self.pp = size, pp

    def __call__(self, path: str | Path | None) -> torch.Tensor:
        with Image.open(path) as img:
            return preprocess_image(img, self.size, self.pp)


class _DecodeMask:
    def __init__(self, size: int, rule: str):
        self.size, self.rule = size, rule

    def __call__(self, path: str | Path | None) -> torch.Tensor:
        return load_mask(path, self.size, self.rule)


def _iter_batches(
    paths: Sequence[str | Path | None],
    fn: Callable[[str | Path | None], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int | None,
    progress: bool,
    desc: str,
) -> Iterator[torch.Tensor]:
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 0 or batch_size < 1:
        raise ValueError(f"need num_workers >= 0 and batch_size >= 1, got {workers} and {batch_size}")
    loader = DataLoader(
        _Files(paths, fn),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers > 0 else None,  # torch rejects a prefetch factor without workers
    )
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            if isinstance(batch, _Failure):
                raise DatasetError(batch.message)
            bar.update(len(batch))
            yield batch


def iter_image_batches(
    paths: Sequence[str | Path],
    size: int,
    pp: Preprocess,
    *,
    batch_size: int = 8,
    num_workers: int | None = None,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Preprocessed images in file order, ``batch_size`` at a time: ``[B, 3, S, S]`` float32."""
    # Bad arguments fail here, not as per-file read errors inside the workers.
    if pp.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {pp.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    yield from _iter_batches(
        paths, _DecodeImage(size, pp), batch_size=batch_size, num_workers=num_workers, progress=progress,
        desc="images",
    )


def load_images(
    paths: Sequence[str | Path],
    size: int,
    pp: Preprocess,
    num_workers: int | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> torch.Tensor:
    """All images, preprocessed (``preprocess_image``), in file order: ``[N, 3, S, S]`` float32.

    ``num_workers`` decoding processes (default ``default_num_workers()``; 0 = serial).
    Unreadable files raise DatasetError naming the file.
    """
    if len(paths) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    return torch.cat(list(iter_image_batches(
        paths, size, pp, batch_size=batch_size, num_workers=num_workers, progress=progress
    )))


def load_masks(
    paths: Sequence[str | Path | None],
    size: int,
    rule: str,
    num_workers: int | None = None,
    progress: bool = True,
    batch_size: int = 16,
) -> torch.Tensor:
    """Ground-truth masks (``load_mask``; None -> all False) in order: ``[N, S, S]`` bool."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; valid: {', '.join(MASK_RULES)}")
    if len(paths) == 0:
        return torch.empty(0, size, size, dtype=torch.bool)
    return torch.cat(list(_iter_batches(
        paths, _DecodeMask(size, rule), batch_size=batch_size, num_workers=num_workers, progress=progress,
        desc="masks",
    )))
