"""The bank's contents: stored tokens, class tokens, names and content hashes of M reference images,
and how they change (build, ``add`` with duplicate skipping, FIFO eviction beyond ``max_size``).

**What is stored**: per tapped layer the patch tokens exactly as the backbone returned them
([M, L, C], fp16 from CUDA backbones, fp32 on CPU), and the class tokens [M, D]. Not the LayerNorm'd
features, nor Z per (layer, r): LNAMD is per image (one LayerNorm over the image's own (C, G, G) map,
then a box mean inside the image), so recomputing it from the tokens gives the very numbers the batch
pipeline uses; every r and the aligned window stay free to change at scoring time; and fp16 tokens are
half the size of fp32 LN'd features and 1/|r_list| of Z per r.

**Duplicates**: ``add`` skips an image whose content hash (SHA-256 of the file bytes, of a PIL image's
pixels or of a tensor row) is already in the bank, or, for bank images without a hash (version-1
files), whose name (path) is; ``duplicates`` lists them. Adding changes every leave-one-out score (each
bank image gets more neighbours), so the cached calibration is dropped and recomputed on the next
``leave_one_out`` (the CLI's ``score --add-ok`` recomputes it before saving when the bank had it).

The caches of the scoring side (``_zcache``, ``_loo``) live here because every change of the contents
must drop them (``_changed``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import MuScConfig
from ..ops.lnamd import grid_of
from ..pipeline import MuSc, resolve_device

# Config fields that decide the stored features: a bank only scores images embedded the same way.
FEATURE_KEYS = ("backbone", "pretrained", "weights", "image_size", "layers", "precision", "quick_gelu",
                "compat")
# Config fields that decide the leave-one-out scores (cached in the bank and its file).
SCORING_KEYS = ("r_list", "topmin", "compat", "msm_precision", "aligned_window")


class BankError(ValueError):
    """A bank cannot be built, loaded or used; the message is one line."""


def feature_hash(config: MuScConfig) -> str:
    """Hash of the feature-defining config fields (``FEATURE_KEYS``), 16 hex digits."""
    d = config.to_dict()
    blob = json.dumps({k: d[k] for k in FEATURE_KEYS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scoring_key(config: MuScConfig, size: int) -> str:
    d = config.to_dict()
    blob = json.dumps({**{k: d[k] for k in SCORING_KEYS}, "size": size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(item) -> str:
    """SHA-256 of an image's content: a file's bytes, a PIL image's mode, size and pixels, or a
    [3, H, W] tensor's dtype, shape and bytes (so the same file under two paths is one image)."""
    h = hashlib.sha256()
    if isinstance(item, (str, Path)):
        with open(item, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    elif isinstance(item, torch.Tensor):
        t = item.detach().contiguous().cpu()
        h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    else:  # a PIL image
        h.update(f"pil|{item.mode}|{item.size}|".encode())
        h.update(item.tobytes())
    return h.hexdigest()


def _hashes(items) -> list[str]:
    return [content_hash(it) for it in items]


def expand_images(items: str | Path | Sequence) -> list:
    """Paths, folders (searched recursively, sorted), PIL images, or an [N, 3, H, W] tensor -> a list
    of items (or the tensor itself)."""
    from ..data.base import is_image

    if isinstance(items, torch.Tensor):
        return items
    if isinstance(items, (str, Path)):
        items = [items]
    out: list = []
    for it in items:
        if isinstance(it, (str, Path)):
            p = Path(it)
            if p.is_dir():
                found = sorted((q for q in p.rglob("*") if is_image(q)), key=lambda q: str(q))
                if not found:
                    raise BankError(f"{p}: no images in this folder")
                out.extend(str(q) for q in found)
            elif p.is_file():
                out.append(str(p))
            else:
                raise BankError(f"{p}: no such image file or folder")
        else:
            out.append(it)
    if not out:
        raise BankError("no images given")
    return out


def _names(items) -> list[str]:
    if isinstance(items, torch.Tensor):
        return [f"tensor[{i}]" for i in range(len(items))]
    return [str(it) if isinstance(it, (str, Path)) else f"image[{i}]" for i, it in enumerate(items)]


class BankStore:
    """The contents of a bank (see ``musc_fast.bank.Bank`` for the attributes); scoring and the file
    format are added by ``BankScoring`` and ``BankFile``."""

    def __init__(self, tokens: Sequence[torch.Tensor], cls: torch.Tensor | None, config: MuScConfig, *,
                 names: Sequence[str] | None = None, max_size: int | None = None,
                 hashes: Sequence[str | None] | None = None):
        if not tokens:
            raise BankError("a bank needs at least one layer of tokens")
        tokens = [torch.as_tensor(t) for t in tokens]
        m, length = tokens[0].shape[:2]
        for t in tokens:
            if t.ndim != 3 or t.shape[:2] != (m, length):
                raise BankError(f"every layer must be [M={m}, L={length}, C], got {tuple(t.shape)}")
        grid_of(length)
        if len(tokens) != len(config.layers):
            raise BankError(f"{len(tokens)} layers of tokens but the config taps {len(config.layers)}")
        if cls is not None and len(cls) != m:
            raise BankError(f"{m} images of tokens but {len(cls)} class tokens")
        if max_size is not None and max_size < 1:
            raise BankError(f"max_size must be >= 1, got {max_size}")
        self.tokens = [t.contiguous() for t in tokens]
        self.cls = None if cls is None else torch.as_tensor(cls).contiguous()
        self.config = config
        self.names = list(names) if names is not None else [f"image[{i}]" for i in range(m)]
        if len(self.names) != m:
            raise BankError(f"{m} images but {len(self.names)} names")
        # content hash per image (None: unknown, e.g. a version-1 file or ``from_features``)
        self.hashes: list[str | None] = list(hashes) if hashes is not None else [None] * m
        if len(self.hashes) != m:
            raise BankError(f"{m} images but {len(self.hashes)} content hashes")
        self.max_size = max_size
        self._model: MuSc | None = None
        self._version = 0  # bumped by every change of the contents: invalidates the caches
        self._zcache: tuple | None = None  # (key, {layer: [Z per r]})
        self._loo: tuple[str, torch.Tensor] | None = None  # (scoring key, patch scores [M, G, G] f64)
        self._evict()

    # --- size and shape --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tokens[0].shape[0]

    @property
    def num_patches(self) -> int:
        return self.tokens[0].shape[1]

    @property
    def grid(self) -> int:
        return grid_of(self.num_patches)

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (tokens and class tokens)."""
        ts = self.tokens + ([self.cls] if self.cls is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def __repr__(self) -> str:
        return (f"Bank({len(self)} images, {len(self.tokens)} layers, L={self.num_patches}, "
                f"{self.nbytes() / 2**20:.1f} MiB, backbone={self.config.backbone}, "
                f"max_size={self.max_size})")

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_features(cls, layer_tokens: Sequence, cls_tokens=None, *, config: MuScConfig,
                      names: Sequence[str] | None = None, max_size: int | None = None) -> "BankStore":
        """A bank from features a frontend already has.

        Args:
            layer_tokens: one [M, L, C] array per tapped layer (CLS removed), numpy or torch.
            cls_tokens: [M, D] or None (RsCIN then cannot run).
            config: the configuration they were made with (``len(config.layers)`` layers).
        """
        tokens = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in layer_tokens]
        if cls_tokens is not None and not isinstance(cls_tokens, torch.Tensor):
            cls_tokens = torch.from_numpy(np.asarray(cls_tokens))
        return cls(tokens, cls_tokens, config, names=names, max_size=max_size)

    @classmethod
    def build(cls, images, config: MuScConfig | None = None, *, model: MuSc | None = None,
              max_size: int | None = None, chunk: int | None = None, progress: bool = True,
              hashes: bool = True) -> "BankStore":
        """Embed reference images and keep their tokens.

        Args:
            images: image paths, folders (all images below them), PIL images, or an [N, 3, H, W]
                tensor in [0, 1].
            config: the run configuration (default ``model.config``, or the paper preset).
            model: a ``MuSc`` to embed with (its backbone is reused); default ``MuSc(config)``.
            max_size: keep at most this many images (the most recent ones when more are given).
            chunk: images decoded and embedded at once (default 4 batches): only one chunk of pixels
                and backbone outputs is alive besides the bank itself.
            hashes: store each image's content hash (``add`` then skips duplicates by content).
        """
        model = _resolve_model(model, config)
        items = expand_images(images)
        names = _names(items)
        if max_size is not None and len(names) > max_size:
            items, names = items[len(names) - max_size:], names[len(names) - max_size:]
        tokens, cls_tokens = _embed(model, items, chunk=chunk, progress=progress)
        digests = _hashes(items) if hashes else None
        bank = cls(tokens, cls_tokens, model.config, names=names, max_size=max_size, hashes=digests)
        bank._model = model
        return bank

    def with_config(self, **overrides) -> "BankStore":
        """The same stored features with other scoring options (r_list, topmin, rscin_k, msm_precision,
        aligned_window, device, batch_size); changing a feature-defining field is an error."""
        new = dataclasses.replace(self.config, **overrides)
        changed = [k for k in FEATURE_KEYS if getattr(new, k) != getattr(self.config, k)]
        if changed:
            raise BankError(f"cannot change {', '.join(changed)} of a bank: its features were made with "
                            f"them; build a new bank")
        bank = type(self)(self.tokens, self.cls, new, names=self.names, max_size=self.max_size, hashes=self.hashes)
        bank._model = self._model
        bank._loo = self._loo  # still valid if the scoring options did not change (the key says)
        return bank

    # --- rolling update --------------------------------------------------------------------------
    def duplicates(self, images) -> dict[int, str]:
        """Input index -> the bank name it duplicates, for images already in the bank (same content
        hash; by name where the bank image has no hash) or given twice in ``images``."""
        items = expand_images(images)
        names = _names(items)
        known = {h: n for h, n in zip(self.hashes, self.names) if h is not None}
        unhashed = {n for h, n in zip(self.hashes, self.names) if h is None}
        out: dict[int, str] = {}
        for i, (item, name) in enumerate(zip(items, names)):
            digest = content_hash(item)
            if digest in known:
                out[i] = known[digest]
            elif name in unhashed:
                out[i] = name
            else:
                known[digest] = name  # a second copy within ``images`` is a duplicate of the first
        return out

    def add(self, images, *, model: MuSc | None = None, progress: bool = False,
            skip_duplicates: bool = True) -> list[str]:
        """Embed images and append them (FIFO eviction beyond ``max_size``). Returns evicted names.

        Images already in the bank (``duplicates``) are skipped with a warning unless
        ``skip_duplicates`` is False. The cached leave-one-out scores are dropped (they change with the
        contents) and recomputed by the next ``leave_one_out``.
        """
        model = self.model(model)
        items = expand_images(images)
        if isinstance(items, torch.Tensor):
            items = list(items)
        if skip_duplicates:
            dups = self.duplicates(items)
            if dups:
                first = next(iter(dups))
                warnings.warn(f"skipped {len(dups)} image(s) already in the bank, first {_names(items)[first]} "
                              f"(same as {dups[first]})", RuntimeWarning, stacklevel=2)
            items = [it for i, it in enumerate(items) if i not in dups]
        if not items:
            return []
        pixels = torch.stack(items) if all(isinstance(x, torch.Tensor) for x in items) else items
        tokens, cls_tokens = _embed(model, pixels, progress=progress)
        return self.add_features(tokens, cls_tokens, names=_names(items), hashes=_hashes(items))

    def add_features(self, layer_tokens: Sequence, cls_tokens=None, *,
                     names: Sequence[str] | None = None, hashes: Sequence[str | None] | None = None) -> list[str]:
        """Append [b, L, C] tokens per layer (+ [b, D] class tokens). Returns the evicted names."""
        tokens = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in layer_tokens]
        if len(tokens) != len(self.tokens):
            raise BankError(f"got {len(tokens)} layers, the bank has {len(self.tokens)}")
        b = tokens[0].shape[0]
        for old, new in zip(self.tokens, tokens):
            if new.ndim != 3 or new.shape[1:] != old.shape[1:] or new.shape[0] != b:
                raise BankError(f"new tokens {tuple(new.shape)} do not match the bank's "
                                f"[M, {old.shape[1]}, {old.shape[2]}]")
        if (self.cls is None) != (cls_tokens is None):
            raise BankError("class tokens must be given exactly when the bank has them")
        names = list(names) if names is not None else [f"image[{len(self.names) + i}]" for i in range(b)]
        if len(names) != b:
            raise BankError(f"{b} new images but {len(names)} names")
        hashes = list(hashes) if hashes is not None else [None] * b
        if len(hashes) != b:
            raise BankError(f"{b} new images but {len(hashes)} content hashes")
        self.tokens = [torch.cat([old, new.to(old.device, old.dtype)])
                       for old, new in zip(self.tokens, tokens)]
        if self.cls is not None:
            c = torch.as_tensor(cls_tokens)
            self.cls = torch.cat([self.cls, c.to(self.cls.device, self.cls.dtype)])
        self.names += names
        self.hashes += hashes
        self._changed()
        return self._evict()

    def _evict(self) -> list[str]:
        extra = len(self) - self.max_size if self.max_size is not None else 0
        if extra <= 0:
            return []
        gone = self.names[:extra]
        self.tokens = [t[extra:].contiguous() for t in self.tokens]  # copy: let the old storage go
        self.cls = None if self.cls is None else self.cls[extra:].contiguous()
        self.names = self.names[extra:]
        self.hashes = self.hashes[extra:]
        self._changed()
        return gone

    def _changed(self) -> None:
        # new contents: cached Z and leave-one-out scores no longer describe the bank
        self._version += 1
        self._zcache = None
        self._loo = None

    # --- model -----------------------------------------------------------------------------------
    def model(self, model: MuSc | None = None) -> MuSc:
        """The ``MuSc`` used to embed new images (built from the bank's config on first use)."""
        if model is not None:
            if feature_hash(model.config) != feature_hash(self.config):
                raise BankError("the model's config embeds images differently from the bank's "
                                f"({_diff(model.config, self.config)})")
            self._model = model
        if self._model is None:
            self._model = MuSc(self.config)
        return self._model

    def _device(self) -> torch.device:
        return resolve_device(self.config.device)

    # --- calibration state -----------------------------------------------------------------------
    def _loo_key(self) -> str:
        return _scoring_key(self.config, len(self))

    @property
    def has_calibration(self) -> bool:
        """True when the leave-one-out scores of the current contents and scoring options are at hand
        (loaded from the file or computed by ``leave_one_out``): ``save`` stores them, and
        ``leave_one_out`` and quantile thresholds need no MSM pass."""
        return self._loo is not None and self._loo[0] == self._loo_key()


def _diff(a: MuScConfig, b: MuScConfig) -> str:
    return ", ".join(f"{k}={getattr(a, k)!r} vs {getattr(b, k)!r}" for k in FEATURE_KEYS
                     if getattr(a, k) != getattr(b, k)) or "same fields"


def _resolve_model(model: MuSc | None, config: MuScConfig | None) -> MuSc:
    if model is not None:
        if config is not None and feature_hash(config) != feature_hash(model.config):
            raise BankError(f"config and model disagree ({_diff(config, model.config)})")
        return model
    return MuSc(config or MuScConfig())


def _embed(model: MuSc, items, *, chunk: int | None = None,
           progress: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens [M, L, C] per layer and class tokens [M, D] on the CPU, filled chunk by chunk into
    preallocated tensors (no list of per-chunk copies, no second full copy)."""
    from tqdm.auto import tqdm

    n = len(items)
    step = chunk or max(1, 4 * model.config.batch_size)
    tokens: list[torch.Tensor] = []
    cls_out: torch.Tensor | None = None
    starts = range(0, n, step)
    for s in tqdm(starts, desc="bank", unit="chunk", disable=not progress or len(starts) < 2):
        e = min(n, s + step)
        pixels = model.preprocess(items[s:e], progress=False)
        toks, c = model.extract(pixels, progress=False, need_cls=True)
        if not tokens:
            tokens = [torch.empty((n, *t.shape[1:]), dtype=t.dtype) for t in toks]
            cls_out = torch.empty((n, *c.shape[1:]), dtype=c.dtype)
        for dst, t in zip(tokens, toks):
            dst[s:e] = t.cpu()
        cls_out[s:e] = c.cpu()
        del pixels, toks, c
    return tokens, cls_out
