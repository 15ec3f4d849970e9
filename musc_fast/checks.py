"""Guards against bad input and bad numbers, with one-line messages.

* ``check_finite_tokens``: NaN/Inf in backbone features would poison every image's scores (each image
  is compared with all others), so they are an error naming the images (``NonFiniteError``).
* ``check_finite_scores``: scores are finite whenever the features are, except for the original's
  deliberate NaN (``compat=True``: N <= 4, constant scores): outside compat mode a non-finite score is
  an error; in compat mode a ``NonFiniteWarning`` flags it.
* ``check_image_size`` / ``check_layers``: settings that a backbone cannot honour.
* ``InputWarning``: input that is accepted but changed (a tiny image upsampled to S x S).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

# Images per chunk are chosen so that one chunk's isfinite temporary stays under this many elements.
_CHECK_ELEMS = 1 << 24


class InputWarning(UserWarning):
    """An input was accepted but changed or looks wrong (e.g. an image smaller than one patch)."""


class NonFiniteWarning(UserWarning):
    """Compat mode kept the original's NaN scores (N <= 4, constant scores); metrics are undefined."""


class NonFiniteError(ValueError):
    """NaN or Inf where finite numbers are needed. ``indices``: the images concerned (input order)."""

    def __init__(self, message: str, indices: Sequence[int] = ()):
        super().__init__(message)
        self.indices = list(indices)


def nonfinite_images(x: torch.Tensor | np.ndarray) -> list[int]:
    """Indices i for which ``x[i]`` holds a NaN or an Inf. ``x``: [N, ...], chunked over N so that the
    boolean temporary stays small (tokens can be gigabytes)."""
    if isinstance(x, np.ndarray):
        return [int(i) for i in np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))]
    n = x.shape[0]
    per = max(1, _CHECK_ELEMS // max(1, x[0].numel())) if n else 1
    bad: list[int] = []
    for s in range(0, n, per):
        ok = torch.isfinite(x[s:s + per]).flatten(1).all(dim=1)
        if not bool(ok.all()):
            bad.extend(s + int(i) for i in torch.nonzero(~ok).flatten().tolist())
    return bad


def _names(indices: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def check_finite_tokens(layer_tokens: Sequence[torch.Tensor], cls_tokens: torch.Tensor | None) -> None:
    """Raise ``NonFiniteError`` if any layer's tokens [N, L, C] or the class tokens [N, D] hold NaN/Inf."""
    bad: set[int] = set()
    where = []
    for k, t in enumerate(layer_tokens):
        rows = nonfinite_images(t)
        if rows:
            bad.update(rows)
            where.append(f"layer {k}")
    if cls_tokens is not None:
        rows = nonfinite_images(cls_tokens)
        if rows:
            bad.update(rows)
            where.append("class tokens")
    if bad:
        order = sorted(bad)
        raise NonFiniteError(
            f"non-finite backbone features (NaN/Inf in {', '.join(where)}) for {len(order)} image(s) at positions "
            f"{_names(order)}: they would make every score NaN ({_token_hint(layer_tokens)})",
            order)


def _token_hint(layer_tokens: Sequence[torch.Tensor]) -> str:
    # Only half-precision features can overflow at image values; fp32 NaN come from the input or the weights.
    dtype = layer_tokens[0].dtype if len(layer_tokens) else None
    if dtype in (torch.float16, torch.bfloat16):
        return (f"the features are {str(dtype).replace('torch.', '')}: an overflow? try --precision fp32; "
                "else check the input images for NaN/Inf pixels and the weights")
    return (f"the features are {str(dtype).replace('torch.', '')}, so not a half-precision overflow: check the "
            "input images for NaN/Inf pixels and the weights")


def check_finite_scores(scores: np.ndarray | torch.Tensor, what: str, *, compat: bool, hint: str = "") -> None:
    """Non-finite ``scores`` [N, ...]: a ``NonFiniteError`` (default) or a ``NonFiniteWarning`` (compat)."""
    rows = nonfinite_images(scores)
    if not rows:
        return
    msg = f"non-finite {what} for {len(rows)} image(s) at positions {_names(rows)}"
    if compat:
        warnings.warn(f"{msg} (compat mode keeps the original's NaN; metrics are undefined)", NonFiniteWarning,
                      stacklevel=3)
        return
    raise NonFiniteError(msg + (f"; {hint}" if hint else ""), rows)


def check_layers(backbone: str, layers: Sequence[int], depth: int) -> None:
    """ValueError unless every 0-based layer index is in [0, depth) (skipped when depth is unknown, 0)."""
    if depth and any(int(x) < 0 or int(x) >= depth for x in layers):
        raise ValueError(f"layers {list(layers)} out of range for {backbone}: it has {depth} tappable layers, "
                         f"valid indices 0..{depth - 1}")


def check_image_size(backbone: str, image_size: int, patch_size: int, *, compat: bool) -> None:
    """S must be a multiple of the patch size p: the patch grid covers G * p pixels (G = S // p) and the
    original silently ignores the last S - G * p rows and columns. An error naming the nearest valid
    sizes; with ``compat=True`` a warning and the original's flooring."""
    if not patch_size or image_size % patch_size == 0:
        return
    lower = (image_size // patch_size) * patch_size
    upper = lower + patch_size
    left = image_size - lower
    if lower == 0:
        raise ValueError(f"image size {image_size} is smaller than {backbone}'s patch size {patch_size}; "
                         f"use a multiple of {patch_size}, e.g. {upper}")
    if compat:
        warnings.warn(f"image size {image_size} is not a multiple of {backbone}'s patch size {patch_size}: the "
                      f"last {left} pixel rows and columns are ignored, as in the original", InputWarning,
                      stacklevel=3)
        return
    raise ValueError(f"image size {image_size} is not a multiple of {backbone}'s patch size {patch_size} (the "
                     f"last {left} pixels would be ignored); use {lower} or {upper}, or --compat to floor "
                     "like the original")


def tiny_images(sizes: torch.Tensor | np.ndarray, patch_size: int) -> list[int]:
    """Indices of images narrower or lower than one patch (p pixels): squashed to S x S, they are
    upsampled so much that their maps carry little detail. ``sizes``: [N, 2] (width, height); (0, 0)
    entries (unreadable files) are ignored."""
    arr = np.asarray(sizes).reshape(-1, 2)
    return [i for i, (w, h) in enumerate(arr.tolist()) if 0 < min(w, h) < patch_size]


__all__ = ["InputWarning", "NonFiniteWarning", "NonFiniteError", "nonfinite_images", "check_finite_tokens",
           "check_finite_scores", "check_layers", "check_image_size", "tiny_images"]
