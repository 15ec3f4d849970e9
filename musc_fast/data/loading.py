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
from .base import MASK_RULES, DatasetError, UnreadableImageError
from .transforms import INTERPOLATIONS, load_mask, preprocess_image


def default_num_workers() -> int:
    """min(4, CPU count): decoding scales little further and the rest of the pipeline needs cores."""
    return min(4, os.cpu_count() or 1)


# What decoding a bad file raises: OSError (missing, truncated, unidentified, no permission),
# ValueError/SyntaxError (broken headers), DecompressionBombError (absurd pixel counts).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class _Failure:
    # A decoding error, carried back as data: DataLoader would re-raise a worker's exception with a
    # multi-line traceback message, and the CLI wants the one-line DatasetError.
    message: str
    index: int = -1


class _Files(Dataset):
    """Item i = ``fn(paths[i])``, or a ``_Failure`` naming the file."""

    def __init__(self, paths: Sequence[str | Path | None], fn: Callable[[str | Path | None], object]):
        self.paths = list(paths)
        self.fn = fn

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.fn(self.paths[i])
        except READ_ERRORS as exc:  # PIL raises these for unreadable files
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return _Failure(f"{self.paths[i]}: cannot read file ({reason})", i)


def _collate(items: list) -> torch.Tensor | _Failure:
    for x in items:
        if isinstance(x, _Failure):
            return x
    return torch.stack(items)


class _CollateImages:
    """Batch of (pixels [3, S, S], (w, h)) items -> (pixels [B, 3, S, S], sizes [B, 2], failures); an
    unreadable file's slot holds zeros so that batches keep their shape."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, list[_Failure]]:
        zeros = torch.zeros(3, self.size, self.size, dtype=torch.float32)
        ok = [not isinstance(x, _Failure) for x in items]
        pixels = torch.stack([x[0] if good else zeros for x, good in zip(items, ok)])
        sizes = torch.tensor([list(x[1]) if good else [0, 0] for x, good in zip(items, ok)], dtype=torch.int64)
        return pixels, sizes, [x for x, good in zip(items, ok) if not good]


class _DecodeImage:
    # A picklable callable (a lambda would not survive a spawn-started worker).
    def __init__(self, size: int, pp: Preprocess):
        self.size, self.pp = size, pp

    def __call__(self, path: str | Path | None) -> tuple[torch.Tensor, tuple[int, int]]:
        with Image.open(path) as img:
            return preprocess_image(img, self.size, self.pp), img.size


class _DecodeMask:
    def __init__(self, size: int, rule: str):
        self.size, self.rule = size, rule

    def __call__(self, path: str | Path | None) -> torch.Tensor:
        return load_mask(path, self.size, self.rule)


def _iter_loader(
    paths: Sequence[str | Path | None],
    fn: Callable[[str | Path | None], object],
    collate: Callable[[list], object],
    *,
    batch_size: int,
    num_workers: int | None,
    progress: bool,
    desc: str,
) -> Iterator:
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 0 or batch_size < 1:
        raise ValueError(f"need num_workers >= 0 and batch_size >= 1, got {workers} and {batch_size}")
    loader = DataLoader(
        _Files(paths, fn),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers > 0 else None,  # torch rejects a prefetch factor without workers
    )
    done = 0
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            n = min(batch_size, len(paths) - done)
            done += n
            bar.update(n)
            yield batch


def _iter_batches(
    paths: Sequence[str | Path | None],
    fn: Callable[[str | Path | None], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int | None,
    progress: bool,
    desc: str,
) -> Iterator[torch.Tensor]:
    for batch in _iter_loader(paths, fn, _collate, batch_size=batch_size, num_workers=num_workers,
                              progress=progress, desc=desc):
        if isinstance(batch, _Failure):
            raise DatasetError(batch.message)
        yield batch


@dataclass
class LoadedImages:
    """Decoded images and the files that could not be read (``load_images_checked``).

    Attributes:
        pixels: [N, 3, S, S] float32, preprocessed; zeros in the slots of unreadable files.
        sizes: [N, 2] int64 original (width, height) of each file; (0, 0) for unreadable files.
        failures: input index -> one-line message naming the file and the reason.
    """

    pixels: torch.Tensor
    sizes: torch.Tensor
    failures: dict[int, str]


def _check_interpolation(pp: Preprocess) -> None:
    # Bad arguments fail here, not as per-file read errors inside the workers.
    if pp.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {pp.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")


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
    _check_interpolation(pp)
    for pixels, _, failures in _iter_loader(
            paths, _DecodeImage(size, pp), _CollateImages(size), batch_size=batch_size,
            num_workers=num_workers, progress=progress, desc="images"):
        if failures:
            raise UnreadableImageError(failures[0].message)
        yield pixels


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
    Unreadable files raise ``UnreadableImageError`` (a DatasetError) naming the file.
    """
    if len(paths) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    return torch.cat(list(iter_image_batches(
        paths, size, pp, batch_size=batch_size, num_workers=num_workers, progress=progress
    )))


def load_images_checked(
    paths: Sequence[str | Path],
    size: int,
    pp: Preprocess,
    num_workers: int | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> LoadedImages:
    """Like ``load_images``, but unreadable files (missing, truncated, not an image) do not stop the
    load: their slots are zeros and ``failures`` names them. Also returns each file's original size.

    Returns:
        ``LoadedImages`` with pixels [N, 3, S, S], sizes [N, 2] (width, height), failures {index: message}.
    """
    _check_interpolation(pp)
    if len(paths) == 0:
        return LoadedImages(torch.empty(0, 3, size, size), torch.empty(0, 2, dtype=torch.int64), {})
    pixels, sizes, failures = [], [], {}
    for px, sz, bad in _iter_loader(paths, _DecodeImage(size, pp), _CollateImages(size), batch_size=batch_size,
                                    num_workers=num_workers, progress=progress, desc="images"):
        pixels.append(px)
        sizes.append(sz)
        failures.update((f.index, f.message) for f in bad)
    return LoadedImages(torch.cat(pixels), torch.cat(sizes), failures)


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
