"""Decoding many files in worker processes, in a fixed order, with a progress bar.

A torch DataLoader over the file list (``shuffle=False``, so batches come back in order whatever the
worker count): worker processes decode and resize, batches travel through shared memory.
``num_workers=0`` decodes serially in this process and gives identical tensors.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..backbones.base import Preprocess
from .base import MASK_RULES, Category, DatasetError, UnreadableImageError
from .transforms import INTERPOLATIONS, binarise_mask, load_mask, preprocess_image, upright_size


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
            return preprocess_image(img, self.size, self.pp), upright_size(img)


class _DecodeMask:
    def __init__(self, size: int, rule: str, threshold: int | None = 0):
        self.size, self.rule, self.threshold = size, rule, threshold

    def __call__(self, path: str | Path | None) -> torch.Tensor:
        return load_mask(path, self.size, self.rule, self.threshold)


class _DecodeMaskSized:
    """A mask path -> (mask [S, S] bool, mask (w, h), its image's (w, h)); sizes are upright, (0, 0)
    for no mask. The image's size comes from its header only."""

    def __init__(self, size: int, rule: str, threshold: int | None, image_of: dict[str, str]):
        self.size, self.rule, self.threshold, self.image_of = size, rule, threshold, image_of

    def __call__(self, path: str | Path | None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        if path is None:
            return torch.zeros(self.size, self.size, dtype=torch.bool), (0, 0), (0, 0)
        with Image.open(path) as m:
            msize = upright_size(m)
            mask = torch.from_numpy(binarise_mask(m, self.size, self.rule, self.threshold))
        with Image.open(self.image_of[str(path)]) as img:
            isize = upright_size(img)
        return mask, msize, isize


def _collate_sized(items: list) -> tuple[torch.Tensor, list, list] | _Failure:
    for x in items:
        if isinstance(x, _Failure):
            return x
    return torch.stack([x[0] for x in items]), [x[1] for x in items], [x[2] for x in items]


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
    threshold: int | None = 0,
) -> torch.Tensor:
    """Ground-truth masks (``load_mask``; None -> all False) in order: ``[N, S, S]`` bool. Without the
    size and empty-mask checks of ``load_category_masks``."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; valid: {', '.join(MASK_RULES)}")
    _check_threshold(threshold)
    if len(paths) == 0:
        return torch.empty(0, size, size, dtype=torch.bool)
    return torch.cat(list(_iter_batches(
        paths, _DecodeMask(size, rule, threshold), batch_size=batch_size, num_workers=num_workers, progress=progress,
        desc="masks",
    )))


def _check_threshold(threshold: int | None) -> None:
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int)
                                  or not 0 <= threshold <= 254):
        raise ValueError(f"mask_threshold must be an integer in 0..254 or None (the original's rule), "
                         f"got {threshold!r}")


def _size_line(mask: Path, msize: tuple[int, int], image: Path, isize: tuple[int, int]) -> str:
    return f"{mask} is {msize[0]}x{msize[1]} but its image {image.name} is {isize[0]}x{isize[1]}"


def mask_size_mismatches(category: Category) -> list[str]:
    """One line per mask whose (upright) size differs from its image's, read from the file headers
    only (no pixels are decoded). The loaders resize such masks to S x S like any other, which
    stretches them if the aspect ratios differ; ``run --strict`` refuses them with this list."""
    out = []
    for s in category.samples:
        if s.mask_path is None:
            continue
        with Image.open(s.mask_path) as m, Image.open(s.path) as img:
            msize, isize = upright_size(m), upright_size(img)
        if msize != isize:
            out.append(_size_line(s.mask_path, msize, s.path, isize))
    return out


def check_mask_sizes(category: Category) -> None:
    """DatasetError (one line, the first mask and how many) if any mask's size differs from its image's
    (``mask_size_mismatches``); what ``run --strict`` checks before any scoring."""
    bad = mask_size_mismatches(category)
    if bad:
        raise DatasetError(f"{bad[0]} ({len(bad)} mask(s) of category {category.name!r} differ in size from their "
                           "image; --strict refuses to resize them)")


def load_category_masks(
    category: Category,
    size: int,
    *,
    threshold: int | None = 0,
    num_workers: int | None = None,
    progress: bool = True,
    batch_size: int = 16,
) -> torch.Tensor:
    """The ground-truth masks of a category, ``[N, S, S]`` bool (``binarise_mask`` with the category's
    rule and ``threshold``; normal images all False), with two ``InputWarning``s a user must see:

    * masks whose size differs from their image's were resized (the first files named);
    * the category has defective images with masks but not one defect pixel (masks saved too faint
      for ``threshold``, or empty): its pixel metrics will be undefined.
    """
    from ..checks import InputWarning

    if category.mask_rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {category.mask_rule!r}; valid: {', '.join(MASK_RULES)}")
    _check_threshold(threshold)
    paths = category.mask_paths
    if len(paths) == 0:
        return torch.empty(0, size, size, dtype=torch.bool)
    image_of = {str(s.mask_path): str(s.path) for s in category.samples if s.mask_path is not None}
    masks, resized = [], []
    done = 0
    for batch in _iter_loader(paths, _DecodeMaskSized(size, category.mask_rule, threshold, image_of), _collate_sized,
                              batch_size=batch_size, num_workers=num_workers, progress=progress, desc="masks"):
        if isinstance(batch, _Failure):
            raise DatasetError(batch.message)
        m, msizes, isizes = batch
        for k, (ms, isz) in enumerate(zip(msizes, isizes)):
            if ms != isz:
                s = category.samples[done + k]
                resized.append(_size_line(s.mask_path, ms, s.path, isz))
        done += len(m)
        masks.append(m)
    out = torch.cat(masks)
    if resized:
        warnings.warn(f"category {category.name!r}: {len(resized)} mask(s) differ in size from their image and were "
                      f"resized to {size}x{size} (--strict refuses them): {'; '.join(resized[:3])}"
                      + ("; ..." if len(resized) > 3 else ""), InputWarning, stacklevel=2)
    n_masked = sum(1 for s in category.samples if s.label == 1 and s.mask_path is not None)
    if n_masked and not bool(out.any()):
        rule = "the original's rule" if threshold is None else f"pixel value > {threshold}"
        warnings.warn(f"category {category.name!r}: none of the masks of its {n_masked} defective image(s) has a "
                      f"defect pixel ({rule}, after resizing to {size}x{size}); its pixel metrics are undefined: "
                      "check the masks (mask_threshold / --mask-threshold)", InputWarning, stacklevel=2)
    return out
