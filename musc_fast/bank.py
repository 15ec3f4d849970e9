"""A reference bank: score new images, one at a time or a few, against stored features of M images.

MuSc scores a *set* of images against each other (SPEC 3), so one new image alone has nothing to be
compared with (MuSc issues #28, #29, #44). A bank keeps the features of M reference images (recent
production, or known-good images) and scores each new image x with the MuSc rule as if x had been
scored in a batch with them: for each tapped layer and each r, per patch of x the nearest patch in
each bank image, then the interval mean over the M bank images (the sorted per-image distances
``[k_min, k_max)`` with ``interval_bounds(M, topmin)``: x is not in the bank, so all M count), then
the mean over layers and r, bilinear maps and the max as image score, exactly as ``score_features``.
So scoring x against a bank of the other N - 1 images of a batch gives x's row of the batch scores.

**What is stored**: per tapped layer the patch tokens exactly as the backbone returned them
([M, L, C], fp16 from CUDA backbones, fp32 on CPU), and the class tokens [M, D]. Not the LayerNorm'd
features, nor Z per (layer, r): LNAMD is per image (one LayerNorm over the image's own (C, G, G) map,
then a box mean inside the image), so recomputing it from the tokens gives the very numbers the batch
pipeline uses; every r and the aligned window stay free to change at scoring time; and fp16 tokens are
half the size of fp32 LN'd features and 1/|r_list| of Z per r. The leave-one-out scores of the bank
(thresholds, RsCIN) are ``score_features`` on the same tokens. On the device the bank's Z per
(layer, r) can be cached between calls (``musc_fast.memory.plan_bank`` decides from free memory);
otherwise each call makes Z chunk by chunk, so memory stays bounded for any M.

**RsCIN** re-scores image scores by their class-token neighbours *within a set*, after min-max
normalising the set's scores. A lone new image has no set, so bank scoring has it **off by default**
(image score = the max of the map, comparable between calls and thresholdable). ``rscin=True`` runs it
over the union of the bank (its leave-one-out scores and class tokens) and the new images, and returns
the new images' entries: normalised to that union, so their values move with the bank's range.

**File format** (``save``/``load``): safetensors (no pickle), tensors ``tokens.<i>`` per layer,
``cls``, and ``loo.patch_scores`` when the leave-one-out scores were computed; metadata holds the
format name and version, the full config JSON, a hash of the feature-defining config fields, the image
names, ``max_size``, and a SHA-256 of all tensor bytes. ``load`` checks all of them and raises a
one-line ``BankError`` on any mismatch.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import ops
from .config import MuScConfig
from .memory import plan_bank
from .ops.interval import interval_bounds
from .ops.lnamd import grid_of
from .ops.msm import cross_similarity_torch, interval_mean_from_similarity
from .outputs import OutputError
from .pipeline import MuSc, Result, _Timer, resolve_device, score_features

FORMAT = "musc_fast.bank"
FORMAT_VERSION = 1
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


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def expand_images(items: str | Path | Sequence) -> list:
    """Paths, folders (searched recursively, sorted), PIL images, or an [N, 3, H, W] tensor -> a list
    of items (or the tensor itself)."""
    from .data.base import is_image

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


class Bank:
    """Stored reference features and the MuSc rule to score new images against them.

    >>> bank = Bank.build("good_images/", MuScConfig.preset("offline"))
    >>> bank.save("line3.safetensors")
    >>> result = Bank.load("line3.safetensors").score(["new.png"])    # result.image_scores[0]

    Attributes:
        tokens: one [M, L, C] tensor per tapped layer (the backbone's dtype), oldest image first.
        cls: [M, D] class tokens, or None.
        config: the run configuration (features must match ``feature_hash``; r_list, topmin, RsCIN,
            msm_precision and aligned_window may be changed with ``with_config``).
        names: one name per image (its path, when built from files).
        max_size: keep at most this many images; ``add`` evicts the oldest first (FIFO).
    """

    def __init__(self, tokens: Sequence[torch.Tensor], cls: torch.Tensor | None, config: MuScConfig, *,
                 names: Sequence[str] | None = None, max_size: int | None = None):
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
                      names: Sequence[str] | None = None, max_size: int | None = None) -> "Bank":
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
              max_size: int | None = None, chunk: int | None = None, progress: bool = True) -> "Bank":
        """Embed reference images and keep their tokens.

        Args:
            images: image paths, folders (all images below them), PIL images, or an [N, 3, H, W]
                tensor in [0, 1].
            config: the run configuration (default ``model.config``, or the paper preset).
            model: a ``MuSc`` to embed with (its backbone is reused); default ``MuSc(config)``.
            max_size: keep at most this many images (the most recent ones when more are given).
            chunk: images decoded and embedded at once (default 4 batches): only one chunk of pixels
                and backbone outputs is alive besides the bank itself.
        """
        model = _resolve_model(model, config)
        items = expand_images(images)
        names = _names(items)
        if max_size is not None and len(names) > max_size:
            items, names = items[len(names) - max_size:], names[len(names) - max_size:]
        tokens, cls_tokens = _embed(model, items, chunk=chunk, progress=progress)
        bank = cls(tokens, cls_tokens, model.config, names=names, max_size=max_size)
        bank._model = model
        return bank

    def with_config(self, **overrides) -> "Bank":
        """The same stored features with other scoring options (r_list, topmin, rscin_k, msm_precision,
        aligned_window, device, batch_size); changing a feature-defining field is an error."""
        new = dataclasses.replace(self.config, **overrides)
        changed = [k for k in FEATURE_KEYS if getattr(new, k) != getattr(self.config, k)]
        if changed:
            raise BankError(f"cannot change {', '.join(changed)} of a bank: its features were made with "
                            f"them; build a new bank")
        bank = Bank(self.tokens, self.cls, new, names=self.names, max_size=self.max_size)
        bank._model = self._model
        bank._loo = self._loo  # still valid if the scoring options did not change (the key says)
        return bank

    # --- rolling update --------------------------------------------------------------------------
    def add(self, images, *, model: MuSc | None = None, progress: bool = False) -> list[str]:
        """Embed images and append them (FIFO eviction beyond ``max_size``). Returns evicted names."""
        model = self.model(model)
        items = expand_images(images)
        tokens, cls_tokens = _embed(model, items, progress=progress)
        return self.add_features(tokens, cls_tokens, names=_names(items))

    def add_features(self, layer_tokens: Sequence, cls_tokens=None, *,
                     names: Sequence[str] | None = None) -> list[str]:
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
        self.tokens = [torch.cat([old, new.to(old.device, old.dtype)])
                       for old, new in zip(self.tokens, tokens)]
        if self.cls is not None:
            c = torch.as_tensor(cls_tokens)
            self.cls = torch.cat([self.cls, c.to(self.cls.device, self.cls.dtype)])
        names = list(names) if names is not None else [f"image[{len(self.names) + i}]" for i in range(b)]
        if len(names) != b:
            raise BankError(f"{b} new images but {len(names)} names")
        self.names += names
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

    # --- scoring ---------------------------------------------------------------------------------
    def score(self, images, *, model: MuSc | None = None, rscin: bool = False, threshold=None,
              chunk: int = 64, progress: bool = False) -> Result:
        """Score new images against the bank.

        Args:
            images: paths, folders, PIL images, or an [B, 3, H, W] tensor in [0, 1].
            rscin: re-score over bank + new images (see the module docstring); default off.
            threshold: a ``musc_fast.threshold.Threshold`` or a number: sets ``labels`` and ``masks``.
            chunk: new images decoded and embedded at once.
        Returns:
            ``Result`` for the B images (patch scores, maps, image scores; labels/masks with a threshold).
        """
        mdl = self.model(model)
        items = expand_images(images)
        timer = _Timer(self._device())
        if mdl.dtype != self.tokens[0].dtype:
            warnings.warn(f"the bank holds {self.tokens[0].dtype} tokens but new images are embedded in "
                          f"{mdl.dtype}: scores differ slightly from a batch run", RuntimeWarning,
                          stacklevel=2)
        parts, cls_parts = [], []
        for s in range(0, len(items), chunk):
            with timer.stage("load"):
                pixels = mdl.preprocess(items[s:s + chunk], progress=progress)
            with timer.stage("backbone"):
                tokens, cls_tokens = mdl.extract(pixels, progress=progress, need_cls=rscin)
            parts.append(self._patch_scores(tokens, timer))
            cls_parts.append(cls_tokens)
        patch = torch.cat(parts)
        cls_all = torch.cat(cls_parts) if rscin else None
        return self._finish(patch, cls_all, rscin=rscin, threshold=threshold, timer=timer)

    def score_features(self, layer_tokens: Sequence, cls_tokens=None, *, rscin: bool = False,
                       threshold=None) -> Result:
        """Score new images given their tokens: one [B, L, C] array per tapped layer (+ [B, D] class
        tokens when ``rscin``). Same rule as ``score``."""
        tokens = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in layer_tokens]
        if cls_tokens is not None and not isinstance(cls_tokens, torch.Tensor):
            cls_tokens = torch.from_numpy(np.asarray(cls_tokens))
        timer = _Timer(self._device())
        patch = self._patch_scores(tokens, timer)
        return self._finish(patch, cls_tokens, rscin=rscin, threshold=threshold, timer=timer)

    def _device(self) -> torch.device:
        return resolve_device(self.config.device)

    def _check_query(self, tokens: Sequence[torch.Tensor]) -> None:
        if len(tokens) != len(self.tokens):
            raise BankError(f"got {len(tokens)} layers of tokens, the bank has {len(self.tokens)}")
        for new, old in zip(tokens, self.tokens):
            if new.ndim != 3 or new.shape[1:] != old.shape[1:] or new.shape[0] != tokens[0].shape[0]:
                raise BankError(f"new tokens {tuple(new.shape)} do not match the bank's "
                                f"[B, {old.shape[1]}, {old.shape[2]}]")

    def _patch_scores(self, tokens: Sequence[torch.Tensor], timer: _Timer) -> torch.Tensor:
        """[B, L] float64 on the device: mean over layers and r of the bank MSM scores."""
        self._check_query(tokens)
        c, dev = self.config, self._device()
        m, length = len(self), self.num_patches
        if m < 1:
            raise BankError("the bank is empty")
        b = tokens[0].shape[0]
        k_min, k_max = interval_bounds(m, c.topmin, compat=c.compat)
        r_list = list(c.r_list)
        plan = plan_bank(b, m, length, max(t.shape[2] for t in self.tokens), n_layers=len(self.tokens),
                         n_r=len(r_list), topmin=c.topmin, device=dev)
        if self._zcache is not None and self._zcache[0] == self._z_key(dev):
            # a cache made by an earlier call: free memory no longer counts it, so keep using it
            plan = dataclasses.replace(plan, cache_z=True, bank_chunk=m)
        cache = self._z_cache(dev, plan.bank_chunk, timer) if plan.cache_z else None
        acc = torch.zeros((b, length), dtype=torch.float64, device=dev)
        for q0 in range(0, b, plan.query_block):
            q1 = min(b, q0 + plan.query_block)
            for li, layer in enumerate(tokens):
                with timer.stage("lnamd"):
                    zq = ops.lnamd_multi(layer[q0:q1].to(dev), r_list)
                sims = [torch.empty((q1 - q0, length, m), dtype=torch.float32, device=dev) for _ in r_list]
                for m0 in range(0, m, plan.bank_chunk):
                    m1 = min(m, m0 + plan.bank_chunk)
                    if cache is not None:
                        zr = [z[m0:m1] for z in cache[li]]
                    else:
                        with timer.stage("lnamd"):
                            zr = ops.lnamd_multi(self.tokens[li][m0:m1].to(dev), r_list)
                    with timer.stage("msm"):
                        for sim, a, r in zip(sims, zq, zr):
                            sim[:, :, m0:m1] = cross_similarity_torch(
                                a, r, precision=c.msm_precision, block_elems=plan.block_elems,
                                window=c.aligned_window)
                    del zr
                with timer.stage("msm"):
                    for sim in sims:
                        acc[q0:q1] += interval_mean_from_similarity(sim, k_min, k_max,
                                                                    rows_per_chunk=plan.rows_per_chunk)
                del sims, zq
        return acc / (len(self.tokens) * len(r_list))

    def _z_key(self, dev: torch.device) -> tuple:
        return (str(dev), tuple(self.config.r_list), self._version)

    def _z_cache(self, dev: torch.device, chunk: int, timer: _Timer) -> dict[int, list[torch.Tensor]]:
        """The bank's Z for every (layer, r) on ``dev`` (float32), made once per contents and config."""
        key = self._z_key(dev)
        if self._zcache is not None and self._zcache[0] == key:
            return self._zcache[1]
        self._zcache = None
        r_list, m = list(self.config.r_list), len(self)
        out: dict[int, list[torch.Tensor]] = {}
        with timer.stage("lnamd"):
            for li, t in enumerate(self.tokens):
                zs = [torch.empty(t.shape, dtype=torch.float32, device=dev) for _ in r_list]
                for m0 in range(0, m, chunk):  # chunked: LNAMD temporaries stay at one chunk
                    for dst, z in zip(zs, ops.lnamd_multi(t[m0:m0 + chunk].to(dev), r_list)):
                        dst[m0:m0 + chunk] = z
                out[li] = zs
        self._zcache = (key, out)
        return out

    def _finish(self, patch: torch.Tensor, cls_tokens, *, rscin: bool, threshold, timer: _Timer) -> Result:
        from .threshold import as_threshold

        c = self.config
        b, g = patch.shape[0], self.grid
        thr = None if threshold is None else as_threshold(threshold)
        if rscin and thr is not None and thr.calibrated:
            raise BankError("a leave-one-out (quantile) threshold is on the raw score scale; "
                            "use rscin=False or a fixed threshold")
        with timer.stage("maps"):
            maps, raw = ops.maps_and_image_scores(patch.view(b, g, g), c.image_size)
        raw_np = raw.numpy()
        with timer.stage("rscin"):
            final = self._rscin(raw_np, cls_tokens) if rscin else raw_np.copy()
        res = Result(image_scores=final, raw_image_scores=raw_np,
                     patch_scores=patch.view(b, g, g).cpu().numpy(), anomaly_maps=maps.numpy(),
                     timings=dict(timer.ms))
        if thr is not None:
            res = thr.apply(res)
        return res

    def _rscin(self, raw: np.ndarray, cls_tokens) -> np.ndarray:
        if self.cls is None or cls_tokens is None:
            raise BankError("RsCIN needs class tokens of the bank and of the new images")
        if 0 in tuple(self.config.rscin_k):
            return raw.copy()
        loo = self.leave_one_out().raw_image_scores
        union = np.concatenate([loo, raw])
        cls_all = torch.cat([self.cls.cpu(), torch.as_tensor(cls_tokens).cpu().to(self.cls.dtype)])
        return ops.rscin(union, cls_all, tuple(self.config.rscin_k), compat=self.config.compat)[len(loo):]

    # --- leave-one-out ---------------------------------------------------------------------------
    def leave_one_out(self) -> Result:
        """Each bank image scored against the other M - 1: the batch MSM of the bank (RsCIN off).
        Cached with the contents and scoring options (and saved with the bank)."""
        c = self.config
        if len(self) < 2:
            raise BankError(f"leave-one-out scores need at least 2 bank images, the bank has {len(self)}")
        key = self._loo_key()
        g = self.grid
        if self._loo is not None and self._loo[0] == key:
            patch = self._loo[1]
            maps, raw = ops.maps_and_image_scores(patch, c.image_size)
            return Result(image_scores=raw.numpy().copy(), raw_image_scores=raw.numpy(),
                          patch_scores=patch.numpy(), anomaly_maps=maps.numpy())
        res = score_features(self.tokens, None, image_size=c.image_size, r_list=c.r_list, topmin=c.topmin,
                             rscin_k=(0,), compat=c.compat, msm_precision=c.msm_precision,
                             device=self._device(), aligned_window=c.aligned_window)
        self._loo = (key, torch.from_numpy(res.patch_scores.reshape(len(self), g, g)).clone())
        return res

    def _loo_key(self) -> str:
        return _scoring_key(self.config, len(self))

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank to a safetensors file (atomically: a temporary file, then a rename)."""
        from safetensors.torch import save_file

        from . import __version__

        path = Path(path)
        tensors = {f"tokens.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.tokens)}
        if self.cls is not None:
            tensors["cls"] = self.cls.detach().cpu().contiguous()
        loo_key = ""
        if self._loo is not None and self._loo[0] == self._loo_key():
            tensors["loo.patch_scores"] = self._loo[1].contiguous()
            loo_key = self._loo[0]
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "musc_fast_version": __version__,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "config_hash": feature_hash(self.config),
            "names": json.dumps(self.names),
            "max_size": json.dumps(self.max_size),
            "loo_key": loo_key,
            "checksum": tensors_checksum(tensors),
        }
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            _check_complete(tmp, tensors)  # save_file can drop write errors (seen with a full device)
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path, config: MuScConfig | None = None, *, verify: bool = True) -> "Bank":
        """Read a bank written by ``save``.

        Args:
            config: if given, its feature fields must match the bank's (else ``BankError``); its scoring
                fields (r_list, topmin, device, ...) replace the stored ones.
            verify: check the SHA-256 of the tensor bytes (reads everything once more).
        Raises:
            BankError: missing, corrupt or foreign file, newer format, config hash or checksum mismatch.
        """
        path = Path(path)
        if not path.is_file():
            raise BankError(f"{path}: no such bank file")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for damaged headers and data
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise BankError(f"{path}: not a readable bank file ({reason})") from None
        if meta.get("format") != FORMAT:
            raise BankError(f"{path}: not a musc_fast bank (format {meta.get('format')!r})")
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise BankError(f"{path}: corrupt bank metadata (format_version)") from None
        if version > FORMAT_VERSION:
            raise BankError(f"{path}: bank format version {version} is newer than this musc_fast reads "
                            f"({FORMAT_VERSION}); upgrade musc_fast")
        if version < 1:
            raise BankError(f"{path}: unsupported bank format version {version}")
        try:
            stored = MuScConfig.from_dict(json.loads(meta["config"]))
            names = json.loads(meta["names"])
            max_size = json.loads(meta["max_size"])
        except (KeyError, ValueError, TypeError) as exc:
            raise BankError(f"{path}: corrupt bank metadata ({' '.join(str(exc).split())[:120]})") from None
        if feature_hash(stored) != meta.get("config_hash"):
            raise BankError(f"{path}: config hash mismatch (the metadata was edited or is corrupt)")
        if verify and tensors_checksum(tensors) != meta.get("checksum"):
            raise BankError(f"{path}: checksum mismatch: the file is corrupt")
        if config is not None and feature_hash(config) != feature_hash(stored):
            raise BankError(f"{path}: the bank was built with other features ({_diff(config, stored)}); "
                            f"rebuild it or drop those options")
        n_layers = sum(1 for k in tensors if k.startswith("tokens."))
        try:
            tokens = [tensors[f"tokens.{i}"] for i in range(n_layers)]
        except KeyError:
            raise BankError(f"{path}: corrupt bank (layer tensors are not numbered 0..{n_layers - 1})") \
                from None
        bank = cls(tokens, tensors.get("cls"), config or stored, names=names, max_size=max_size)
        loo = tensors.get("loo.patch_scores")
        if loo is not None and meta.get("loo_key") == bank._loo_key():
            bank._loo = (meta["loo_key"], loo)
        return bank


def _check_complete(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """OSError unless the safetensors file at ``path`` has its full length (8-byte header size + header +
    every tensor's bytes); fsync it so that delayed write errors surface here."""
    expected_data = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
        os.fsync(fh.fileno())
    header = int.from_bytes(head, "little") if len(head) == 8 else 0
    if len(head) < 8 or size != 8 + header + expected_data:
        raise OSError(errno.ENOSPC, f"incomplete file: {size} bytes written, {8 + header + expected_data} "
                                    "expected (disk full?)")


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
