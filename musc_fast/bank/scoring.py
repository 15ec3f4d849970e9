"""Scoring new images against the bank, and the bank's leave-one-out calibration.

MuSc scores a *set* of images against each other (SPEC 3), so one new image alone has nothing to be
compared with (MuSc issues #28, #29, #44). The bank scores each new image x with the MuSc rule as if x
had been scored in a batch with the M bank images: for each tapped layer and each r, per patch of x the
nearest patch in each bank image, then the interval mean over the M bank images (the sorted per-image
distances ``[k_min, k_max)`` with ``interval_bounds(M, topmin)``: x is not in the bank, so all M count),
then the mean over layers and r, bilinear maps and the max as image score, exactly as
``score_features``. So scoring x against a bank of the other N - 1 images of a batch gives x's row of
the batch scores. The leave-one-out scores of the bank (thresholds, RsCIN) are ``score_features`` on
the same tokens. On the device the bank's Z per (layer, r) can be cached between calls
(``musc_fast.memory.plan_bank`` decides from free memory); otherwise each call makes Z chunk by chunk,
so memory stays bounded for any M.

**RsCIN** re-scores image scores by their class-token neighbours *within a set*, after min-max
normalising the set's scores. A lone new image has no set, so bank scoring has it **off by default**
(image score = the max of the map, comparable between calls and thresholdable). ``rscin=True`` runs it
over the union of the bank (its leave-one-out scores and class tokens) and the new images, and returns
the new images' entries: normalised to that union, so their values move with the bank's range.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import engine, ops
from ..memory import plan_bank
from ..ops.interval import interval_bounds
from ..pipeline import MuSc, Result, _Timer, score_features
from .store import BankError, BankStore, expand_images


class BankScoring(BankStore):
    """``score``, ``score_features`` and ``leave_one_out`` of a ``Bank``."""

    def score(self, images, *, model: MuSc | None = None, rscin: bool = False, threshold=None,
              chunk: int = 64, progress: bool = False, on_error: str = "raise",
              on_chunk: Callable[[Result, list[int]], None] | None = None) -> Result:
        """Score new images against the bank.

        Args:
            images: paths, folders, PIL images, or an [B, 3, H, W] tensor in [0, 1].
            rscin: re-score over bank + new images (see the module docstring); default off.
            threshold: a ``musc_fast.threshold.Threshold`` or a number: sets ``labels`` and ``masks``.
            chunk: new images decoded and embedded at once.
            progress: one progress bar over the images.
            on_error: an image file that cannot be read: ``"raise"`` an ``UnreadableImageError`` naming
                it (images of earlier chunks were scored and passed to ``on_chunk``), or ``"skip"`` it
                with the reason in ``Result.skipped`` (input index -> reason).
            on_chunk: called as ``on_chunk(chunk_result, input_indices)`` as soon as each chunk is
                scored (every image is scored on its own against the bank, so chunk results are final);
                with ``rscin`` once at the end, since RsCIN needs every new image.
        Returns:
            ``Result`` for the B readable images, in order (patch scores, maps, image scores;
            labels/masks with a threshold; ``skipped``).
        """
        from tqdm.auto import tqdm

        from ..data import DatasetError, UnreadableImageError
        from ..threshold import as_threshold

        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if rscin and threshold is not None and as_threshold(threshold).calibrated:  # before any work
            raise BankError("a leave-one-out (quantile) threshold is on the raw score scale; "
                            "use rscin=False or a fixed threshold")
        mdl = self.model(model)
        items = expand_images(images)
        timer = _Timer(self._device())
        if mdl.dtype != self.tokens[0].dtype:
            warnings.warn(f"the bank holds {self.tokens[0].dtype} tokens but new images are embedded in "
                          f"{mdl.dtype}: scores differ slightly from a batch run", RuntimeWarning,
                          stacklevel=2)
        parts: list = []  # finished chunk Results (rscin off) or (patch, cls) pairs (rscin on)
        kept: list[int] = []
        plans: list = []
        skipped: dict[int, str] = {}
        bar = tqdm(total=len(items), desc="score", unit="image", disable=not progress)
        try:
            for s in range(0, len(items), chunk):
                idx = list(range(s, min(len(items), s + chunk)))
                block = items[s:s + chunk]
                with timer.stage("load"):
                    if isinstance(block, torch.Tensor) or not all(isinstance(x, (str, Path)) for x in block):
                        pixels, failed = mdl.preprocess(block, progress=False), {}
                    else:
                        pixels, failed = mdl._load_paths(list(block), idx, False)
                if failed:
                    if on_error == "raise":
                        raise UnreadableImageError(next(iter(failed.values())))
                    skipped.update(failed)
                    keep = [k for k, i in enumerate(idx) if i not in failed]
                    idx = [idx[k] for k in keep]
                    pixels = pixels[torch.as_tensor(keep, dtype=torch.long)]
                if idx:
                    with timer.stage("backbone"):
                        tokens, cls_tokens = mdl.extract(pixels, progress=False, need_cls=rscin)
                    patch = self._patch_scores(tokens, timer)
                    chunk_plans = list(getattr(self, "_last_plans", []))
                    plans = plans or chunk_plans  # the first chunk's plans stand for the run (Result.plan)
                    if rscin:
                        parts.append((patch, cls_tokens))
                    else:
                        res = self._finish(patch, None, rscin=False, threshold=threshold, timer=_Timer(timer.device))
                        res.plan = chunk_plans
                        parts.append(res)
                        if on_chunk is not None:
                            on_chunk(res, idx)
                    kept += idx
                bar.update(len(block))
        finally:
            bar.close()
        if not kept:
            raise DatasetError(f"none of the {len(items)} images can be read (first: {next(iter(skipped.values()))})")
        if rscin:
            patch = torch.cat([p for p, _ in parts])
            result = self._finish(patch, torch.cat([c for _, c in parts]), rscin=True, threshold=threshold,
                                  timer=timer)
            if on_chunk is not None:
                on_chunk(result, kept)
        else:
            result = _concat(parts, timer)
        result.skipped = dict(sorted(skipped.items()))
        result.plan = plans
        return result

    def score_features(self, layer_tokens: Sequence, cls_tokens=None, *, rscin: bool = False,
                       threshold=None) -> Result:
        """Score new images given their tokens: one [B, L, C] array per tapped layer (+ [B, D] class
        tokens when ``rscin``). Same rule as ``score``."""
        tokens = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in layer_tokens]
        if cls_tokens is not None and not isinstance(cls_tokens, torch.Tensor):
            cls_tokens = torch.from_numpy(np.asarray(cls_tokens))
        timer = _Timer(self._device())
        patch = self._patch_scores(tokens, timer)
        result = self._finish(patch, cls_tokens, rscin=rscin, threshold=threshold, timer=timer)
        result.plan = list(self._last_plans)
        return result

    def _check_query(self, tokens: Sequence[torch.Tensor]) -> None:
        if len(tokens) != len(self.tokens):
            raise BankError(f"got {len(tokens)} layers of tokens, the bank has {len(self.tokens)}")
        for new, old in zip(tokens, self.tokens):
            if new.ndim != 3 or new.shape[1:] != old.shape[1:] or new.shape[0] != tokens[0].shape[0]:
                raise BankError(f"new tokens {tuple(new.shape)} do not match the bank's "
                                f"[B, {old.shape[1]}, {old.shape[2]}]")

    def _patch_scores(self, tokens: Sequence[torch.Tensor], timer: _Timer) -> torch.Tensor:
        """[B, L] float64 on the device: mean over layers and r of the bank MSM scores (the engine's
        ``bank`` mode: new images x bank chunks, one direction). The pass plans (one per layer and r, as
        ``Result.plan``) are left in ``self._last_plans``."""
        plans: list = []
        self._last_plans = plans
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
        pp = engine.plan_pass("msm", n=min(b, plan.query_block), length=length, device=dev, dtype=torch.float32,
                              precision=c.msm_precision, window=c.aligned_window, memory=plan, bank=True)
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
                        for sim, a, r in zip(sims, zq, zr):  # the engine's primitive, one direction
                            sim[:, :, m0:m1] = engine.cross_table(a, r, pp)
                    del zr
                with timer.stage("msm"):
                    for sim, r in zip(sims, r_list):
                        acc[q0:q1] += engine.interval_mean(sim, k_min, k_max, provider=pp.interval,
                                                           rows_per_chunk=plan.rows_per_chunk, n_others=m)
                        if q0 == 0:
                            plans.append({"layer": li, "r": int(r), **pp.as_dict()})
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
        from ..threshold import as_threshold

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
        if cls_all.dtype == torch.bfloat16:  # numpy (ops.rscin) has no bfloat16; widening is exact
            cls_all = cls_all.float()
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


def _concat(parts: list[Result], timer: _Timer) -> Result:
    """One Result from chunk Results of the same bank (per-image arrays stacked; the call's timings)."""
    def cat(name):
        arrays = [getattr(r, name) for r in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    ms = dict(timer.ms)
    for r in parts:  # maps (and thresholds) ran per chunk on their own timers
        for k, v in r.timings.items():
            ms[k] = ms.get(k, 0.0) + v
    return Result(image_scores=cat("image_scores"), raw_image_scores=cat("raw_image_scores"),
                  patch_scores=cat("patch_scores"), anomaly_maps=cat("anomaly_maps"), timings=ms,
                  labels=cat("labels"), masks=cat("masks"))
