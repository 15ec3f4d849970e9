"""The engine: extract -> aggregate (LNAMD) -> mutual score (MSM) -> maps -> image scores -> RsCIN.

``score_features`` is everything after the backbone, for frontends that bring their own features;
``MuSc`` adds preprocessing and the backbone. Every stage is timed (``Result.timings``).
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import ops
from .backbones import Backbone, build_backbone
from .backbones.weights import check_download_possible
from .checks import (
    InputWarning,
    NonFiniteError,
    check_finite_scores,
    check_finite_tokens,
    check_image_size,
    check_layers,
    tiny_images,
)
from .config import MuScConfig, check_device_available, check_r_for_grid
from .data.base import DatasetError
from .ops.lnamd import grid_of, layer_norm_chw

if TYPE_CHECKING:
    from .memory import MemoryPlan

STAGES = ("load", "backbone", "lnamd", "msm", "maps", "rscin")


@dataclass
class Result:
    """Scores of one set of images scored together.

    Attributes:
        image_scores: [N] float64, after RsCIN (equal to ``raw_image_scores`` when RsCIN is off).
        raw_image_scores: [N] float64, the max of each S x S anomaly map (before RsCIN).
        patch_scores: [N, G, G] float64, the mean over layers and r of the MSM scores.
        anomaly_maps: [N, S, S] float32, ``patch_scores`` upsampled bilinearly (align_corners=True).
        timings: milliseconds per stage for all N images (keys from ``STAGES`` that ran).
        labels: [N] bool, True = NG (anomalous), set when a threshold was applied
            (``musc_fast.threshold``); None otherwise.
        masks: [N, S, S] bool, ``anomaly_maps`` > the pixel threshold, set with ``labels``.
        skipped: input index -> reason, for image files that could not be read and were left out
            (``MuSc.score(..., on_error="skip")``); the arrays above cover the other images, in order.
        plan: the engine's plan of every MSM pass, in order (``engine.PassPlan.as_dict()`` plus where it
            ran: ``subset``, ``layer`` and ``r`` for per-r passes); ``engine.summarize`` condenses it.
    """

    image_scores: np.ndarray
    raw_image_scores: np.ndarray
    patch_scores: np.ndarray
    anomaly_maps: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    labels: np.ndarray | None = None
    masks: np.ndarray | None = None
    skipped: dict[int, str] = field(default_factory=dict)
    plan: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_scores)

    def ms_per_image(self) -> dict[str, float]:
        """``timings`` divided by the number of images, plus their ``total``."""
        n = max(len(self), 1)
        # one-off costs (compilation) are not per-image work
        per = {k: v / n for k, v in self.timings.items() if k != "compile"}
        per["total"] = sum(per.values())
        return per


class _Timer:
    """Accumulates wall time per stage, synchronising CUDA so that GPU work is attributed correctly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - t0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        check_device_available(device)  # cpu, cuda[:i] within device_count, mps when available
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; use --device cpu")
    return dev


def _check_subsets(subsets: Sequence[Sequence[int]] | None, n: int) -> list[list[int]]:
    if subsets is None:
        return [list(range(n))]
    flat = sorted(i for s in subsets for i in s)
    if flat != list(range(n)):
        raise ValueError(f"subsets must partition the {n} images exactly once each")
    return [list(s) for s in subsets]


def score_features(
    layer_tokens: Sequence[torch.Tensor | np.ndarray],
    cls_tokens: torch.Tensor | np.ndarray | None,
    *,
    image_size: int,
    r_list: Sequence[int] = (1, 3, 5),
    topmin: tuple[float, float] = (0.0, 0.3),
    rscin_k: Sequence[int] = (1, 2, 3),
    compat: bool = False,
    msm_precision: str = "fp32",
    subsets: Sequence[Sequence[int]] | None = None,
    device: str | torch.device | None = None,
    aligned_window: int | None = None,
    memory: "MemoryPlan | None" = None,
    _timer: _Timer | None = None,
) -> Result:
    """Everything after the backbone: LNAMD, MSM, maps, image scores and RsCIN.

    Args:
        layer_tokens: one [N, L, C] array per tapped layer (CLS removed, L = G*G row-major).
        cls_tokens: [N, D] image-level tokens for RsCIN, or None to skip RsCIN.
        image_size: S, the side of the anomaly maps.
        r_list, topmin, rscin_k, compat, msm_precision: as in ``MuScConfig``.
        subsets: disjoint index lists that each are scored on their own (``divide_num``); default all
            images together. RsCIN always sees all images.
        device: where to compute; default the device of the first token tensor.
        aligned_window: restrict each patch's nearest-neighbour search to +-w grid steps around its
            own position (``MuScConfig.aligned_window``); None = the full search.
        memory: chunk sizes (``musc_fast.memory.MemoryPlan``); default planned from the free memory of
            ``device`` (the full similarity table when it fits, streaming row groups when not). Under
            torch.distributed with several ranks the passes are sharded (``musc_fast.distributed``).
    Returns:
        ``Result`` for the N images.
    """
    if not layer_tokens:
        raise ValueError("score_features needs at least one layer of tokens")
    tokens = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in layer_tokens]
    dev = torch.device(device) if device is not None else tokens[0].device
    n, length = tokens[0].shape[:2]
    for t in tokens:
        if t.ndim != 3 or t.shape[:2] != (n, length):
            raise ValueError(f"every layer must be [N={n}, L={length}, C], got {tuple(t.shape)}")
    if n < 2 and not compat:
        raise ValueError(f"MuSc scores images against each other and needs at least 2, got {n}")
    g = grid_of(length)
    groups = _check_subsets(subsets, n)
    check_finite_tokens(tokens, None if cls_tokens is None else torch.as_tensor(cls_tokens))
    timer = _timer or _Timer(dev)
    from . import distributed, engine
    from . import memory as mem

    n_max = max(len(i) for i in groups)
    if memory is None:
        budget = distributed.min_over_ranks(mem.budget_for(dev))  # ranks must agree on the blocks
        memory = mem.plan_scoring(n_max, length, tokens[0].shape[2], n_r=len(r_list), topmin=topmin, device=dev,
                                  budget=budget)
    # out of memory (CUDA) while scoring: shrink the plan and repeat the failed step (memory.OomRetry)
    retry = mem.OomRetry(memory, n_max, length, dev)
    plans: list[dict] = []  # the engine's plan of every pass, in order (Result.plan)

    def one_gram(plan: "MemoryPlan", n_sub: int, c_layer: int) -> bool:  # decided per layer and plan
        return engine.use_onegram(n_sub, length, c_layer, r_list, device=dev, window=aligned_window,
                                  memory=plan)[0]

    def gram_pass(normed: torch.Tensor, plan: "MemoryPlan") -> tuple:
        pp = engine.plan_pass("onegram", n=normed.shape[0], length=length, device=dev, dtype=normed.dtype,
                              precision=msm_precision, memory=plan, r_list=r_list)
        k_min, k_max = ops.interval_bounds(normed.shape[0] - 1, topmin, compat=compat)
        return engine.run_onegram(normed, pp, k_min, k_max).sum(0), pp

    def msm_pass(z: torch.Tensor, plan: "MemoryPlan") -> tuple:
        pp = engine.plan_pass("msm", n=z.shape[0], length=length, device=dev, dtype=z.dtype,
                              precision=msm_precision, window=aligned_window, memory=plan, sample=z)
        k_min, k_max = ops.interval_bounds(z.shape[0] - 1, topmin, compat=compat)
        return engine.run_msm(z, pp, k_min, k_max), pp

    def record(scores_and_plan: tuple, **where) -> torch.Tensor:
        scores, pp = scores_and_plan
        plans.append({**where, **pp.as_dict()})
        return scores

    acc = torch.zeros((n, length), dtype=torch.float64, device=dev)
    n_passes = len(tokens) * len(r_list)
    for s_i, idx in enumerate(groups):
        index = torch.as_tensor(idx, device=dev)
        whole = idx == list(range(n))  # no copy of the tokens when all images score together
        for li, layer in enumerate(tokens):
            sub = layer.to(dev) if whole else layer.to(dev).index_select(0, index)
            fits = partial(one_gram, n_sub=len(idx), c_layer=layer.shape[2])
            if fits(retry.plan):  # every r of the layer from one Gram block per pair (engine.onegram)
                with timer.stage("lnamd"):
                    normed = layer_norm_chw(sub)
                try:
                    with timer.stage("msm"):
                        acc[index] += record(retry.call(partial(gram_pass, normed), still_ok=fits),
                                             subset=s_i, layer=li)
                    del sub
                    continue
                except mem.PlanChanged:  # the leaner plan scores this layer by per-r passes below
                    pass
                finally:
                    del normed
            r_groups = [list(r_list)] if retry.plan.lnamd_all_r else [[r] for r in r_list]
            for rs in r_groups:
                with timer.stage("lnamd"):
                    zs = retry.call(partial(mem.lnamd_planned, sub, rs))
                for r, z in zip(rs, zs):
                    with timer.stage("msm"):
                        acc[index] += record(retry.call(partial(msm_pass, z)), subset=s_i, layer=li, r=int(r))
                del zs
            del sub
    patch = acc / n_passes
    check_finite_scores(patch, "patch scores", compat=compat,
                        hint="the features were finite, so this is a bug: please report it")

    with timer.stage("maps"):
        maps, raw = ops.maps_and_image_scores(patch.view(n, g, g), image_size, chunk=memory.map_chunk)
    with timer.stage("rscin"):
        if cls_tokens is None or 0 in tuple(rscin_k):
            final = raw.numpy().copy()
        else:
            final = ops.rscin(raw.numpy(), cls_tokens, tuple(rscin_k), compat=compat)
            check_finite_scores(final, "RsCIN image scores", compat=compat,
                                hint="their class-token windows sum to 0; --rscin-k 0 scores without RsCIN")
    return Result(
        image_scores=final,
        raw_image_scores=raw.numpy(),
        patch_scores=patch.view(n, g, g).cpu().numpy(),
        anomaly_maps=maps.numpy(),
        timings=dict(timer.ms),
        plan=plans,
    )


ImageInput = str | Path | Sequence["str | Path | PIL.Image.Image"] | torch.Tensor  # noqa: F821


def coerce_images(images: ImageInput) -> torch.Tensor | list:
    """What ``MuSc.score`` accepts -> a float32 tensor [N, 3, H, W] in [0, 1] or a list of paths and PIL
    images, with one-line errors instead of silently wrong scores.

    * one path (``str`` or ``Path``) is one image, not a sequence of characters;
    * a uint8 tensor holds 0..255 and is divided by 255; a float tensor must hold finite values in
      [0, 1] (``ValueError`` naming the range found, or ``NonFiniteError`` naming the images with
      NaN/Inf); other dtypes (int16, bool, ...) are refused as ambiguous.
    """
    if isinstance(images, (str, Path)):
        return [images]
    if not isinstance(images, torch.Tensor):
        return list(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"an image tensor must be [N, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.cpu().float().div_(255)
    if not images.is_floating_point():
        raise ValueError(f"an image tensor must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
    x = images.float().cpu()
    from .checks import nonfinite_images

    bad = nonfinite_images(x)
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise NonFiniteError(f"the image tensor holds NaN/Inf values in {len(bad)} image(s), at positions {shown}",
                             bad)
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"a float image tensor must hold values in [0, 1] (as ToTensor gives), got "
                         f"{float(x.min()):.4g}..{float(x.max()):.4g}; divide 0..255 data by 255 or pass uint8")
    return x


class MuSc:
    """Zero-shot anomaly scoring of a set of images of one product by mutual scoring.

    >>> model = MuSc(MuScConfig.preset("offline"))
    >>> result = model.score(["a.png", "b.png", ...])   # all images scored against each other
    """

    def __init__(self, config: MuScConfig | None = None, *, backbone: Backbone | None = None,
                 num_workers: int | None = None):
        """``num_workers``: image-decoding processes for path inputs (None = a default, 0 = serial)."""
        self.config = config or MuScConfig()
        self.device = resolve_device(self.config.device)
        self.num_workers = num_workers
        self._backbone = backbone
        self._custom_backbone = backbone is not None
        self._forward = None  # the (compiled) forward, made on first use
        self._warm_sizes: set[int] = set()  # batch sizes already compiled
        if self.config.runtime not in ("auto", "torch"):
            _ = self.runtime  # a runtime that is not installed fails here, before any image is read

    # --- model -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        p = self.config.precision
        if p == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[p]

    @property
    def backbone(self) -> Backbone:
        """The backbone, built on first use. Raises ValueError for settings it cannot honour: unknown
        name or tag, weights of another architecture (from the builder), layers out of range, an image
        size that is not a multiple of the patch size (a warning with ``compat``)."""
        if self._backbone is None:
            c = self.config
            # offline with nothing cached: one line at once instead of the hub's retries (~1 min)
            check_download_possible(c.backbone, c.pretrained, c.weights)
            model = build_backbone(
                c.backbone, pretrained=c.pretrained, weights=c.weights, image_size=c.image_size,
                layers=c.layers, quick_gelu=c.quick_gelu, compat=c.compat, device=self.device,
                dtype=self.dtype)
            check_layers(c.backbone, c.layers, model.depth)
            check_image_size(c.backbone, c.image_size, model.patch_size, compat=c.compat)
            check_r_for_grid(c.r_list, model.grid_size(c.image_size), c.image_size, model.patch_size)
            self._backbone = model
        return self._backbone

    def check_memory(self, n: int, what: str = "") -> None:
        """Refuse (``memory.InsufficientMemoryError``, a ValueError) to score ``n`` images when even the
        leanest plan cannot fit the free memory (``memory.check_run_fits``), before any image is read."""
        from .memory import check_run_fits

        c, model = self.config, self.backbone
        n_score = -(-n // c.divide_num) if c.divide_num > 1 else n
        check_run_fits(n, c.image_size, model.grid_size(c.image_size), model.tap_dims,
                       token_bytes=torch.empty((), dtype=self.dtype).element_size(), device=self.device,
                       n_score=n_score, topmin=c.topmin, what=what)

    @property
    def forward(self):
        """The backbone's forward, through ``torch.compile`` when ``config.compile`` asks for it."""
        if self._forward is None:
            mode = self.config.compile
            runtime = self.runtime
            if runtime != "torch":
                from .runtimes import RuntimeBackbone

                c = self.config
                self._forward = RuntimeBackbone(self.backbone, runtime, tag=f"{c.pretrained}|{c.weights}",
                                                dtype=self.dtype)
            else:
                self._forward = self.backbone if mode == "off" else torch.compile(self.backbone, mode=mode)
        return self._forward

    @property
    def runtime(self) -> str:
        """The concrete backbone runtime (``config.runtime`` with ``"auto"`` resolved, see
        ``musc_fast.runtimes``): torch whenever compile, a non-fp32 dtype or a custom backbone asks for it."""
        from .runtimes import resolve_runtime

        c = self.config
        if c.runtime == "auto" and (c.compile != "off" or self.dtype != torch.float32 or self._custom_backbone):
            return "torch"
        chosen = resolve_runtime(c.runtime, c.backbone, self.device)
        if chosen != "torch" and self.dtype != torch.float32:
            raise ValueError(f"runtime {chosen!r} runs fp32 backbones only; use --precision fp32 or --runtime torch")
        return chosen

    def warm_up(self, batch_images: torch.Tensor, need_cls: bool = True) -> bool:
        """Run one batch of each size that ``extract`` will use (the full batch and the last, shorter
        one) through the compiled forward, so that compilation and CUDA-graph capture are not timed as
        backbone work; nothing is kept. Returns whether anything was compiled (False without
        ``config.compile`` or when those sizes are compiled already)."""
        bs, n = self.config.batch_size, len(batch_images)
        sizes = {min(bs, n), n % bs or min(bs, n)} - self._warm_sizes
        if self.config.compile == "off" or not sizes:
            return False
        for size in sorted(sizes):
            self.extract(batch_images[:size], progress=False, need_cls=need_cls)
        self._warm_sizes |= sizes
        return True

    # --- stages ----------------------------------------------------------------------------------
    def preprocess(self, images: ImageInput, *, progress: bool = True) -> torch.Tensor:
        """Images -> [N, 3, S, S] float32 on the CPU, normalised for the backbone (SPEC 1.2).

        Paths and PIL images (mixed freely) go through PIL exactly as the original (squash resize, bicubic
        for CLIP, bilinear for DINO), upright by their EXIF orientation. A tensor is RGB [N, 3, H, W],
        float in [0, 1] (like ToTensor's output) or uint8 (see ``coerce_images``), resized with torch's
        antialiased interpolation when H, W differ from S.
        """
        from .data import load_images

        size, pp = self.config.image_size, self.backbone.preprocess
        images = coerce_images(images)
        if isinstance(images, torch.Tensor):
            x = images
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode=pp.interpolation, antialias=True,
                                  align_corners=False)
            mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
            std = torch.tensor(pp.std).view(1, 3, 1, 1)
            return (x - mean) / std
        if images and all(isinstance(im, (str, Path)) for im in images):
            return load_images([str(p) for p in images], size, pp, num_workers=self.num_workers,
                               progress=progress)
        return torch.stack([_preprocess_one(im, i, size, pp) for i, im in enumerate(images)])

    @torch.inference_mode()
    def extract(self, batch_images: torch.Tensor, *, progress: bool = True,
                need_cls: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Backbone features of preprocessed images.

        Args:
            batch_images: [N, 3, S, S] float32 (CPU).
        Returns:
            (tokens: one [N, L, C] tensor per layer on ``self.device`` in the backbone's dtype,
             cls: [N, D] or None when ``need_cls`` is False).
        """
        model, bs = self.forward, self.config.batch_size
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.config.layers]
        cls_parts: list[torch.Tensor] = []
        starts = range(0, len(batch_images), bs)
        for s0 in tqdm(starts, desc="backbone", unit="batch", disable=not progress or len(starts) < 2):
            x = batch_images[s0:s0 + bs].to(self.device, dtype=self.dtype, non_blocking=True)
            out = model(x, need_cls=need_cls)
            for dst, t in zip(per_layer, out.tokens):
                dst.append(t)
            if need_cls:
                cls_parts.append(out.cls)
        tokens = [torch.cat(parts) for parts in per_layer]
        return tokens, (torch.cat(cls_parts) if need_cls else None)

    def score(self, images: ImageInput, *, subsets: Sequence[Sequence[int]] | None = None,
              progress: bool = True, on_error: str = "raise") -> Result:
        """Score images of one category against each other.

        Args:
            images: one path, a list of paths and/or PIL images, or an [N, 3, H, W] tensor, float in [0, 1]
                or uint8 in 0..255 (``coerce_images``: other ranges, NaN/Inf and other dtypes are refused).
            subsets: disjoint index lists scored separately (default: ``divide_num`` subsets, which
                group by parent folder and so need paths, or all images together).
            on_error: an image file that cannot be read (path inputs): ``"raise"`` an
                ``UnreadableImageError`` naming it, or ``"skip"`` it with the reason in
                ``Result.skipped`` (the Result then covers the other images, in order; subsets lose the
                skipped indices). Images narrower or lower than one patch are upsampled to S x S with an
                ``InputWarning``.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        images = coerce_images(images)
        c = self.config
        timer = _Timer(self.device)
        from . import distributed

        paths = None if isinstance(images, torch.Tensor) else list(images)
        if paths is not None and not (paths and all(isinstance(p, (str, Path)) for p in paths)):
            paths = None
        # under torch.distributed each rank decodes and embeds its share of the batches
        self.check_memory(len(images))  # before any image is decoded
        local = distributed.local_indices(len(images), c.batch_size)
        mine = list(range(len(images))) if local is None else local
        failed: dict[int, str] = {}
        with timer.stage("load"):
            if paths is None:
                pixels = self.preprocess(images if local is None else distributed.select(images, local),
                                         progress=progress)
            else:
                pixels, failed = self._load_paths([paths[i] for i in mine], mine, progress)
                if local is not None:  # every rank must learn of every unreadable file
                    failed = self._gather_failures(failed, local, paths)
        if failed and on_error == "raise":
            from .data import UnreadableImageError

            raise UnreadableImageError(next(iter(failed.values())))
        if subsets is None and c.divide_num > 1:
            if paths is None:
                raise ValueError("divide_num > 1 groups images by their parent folder and needs image paths")
            from .data.divide import divide_indices

            subsets = divide_indices([str(p) for p in paths], c.divide_num)
        need_cls = 0 not in c.rscin_k
        keep = [i for i in range(len(images)) if i not in failed] if failed else None
        if keep is not None:
            if len(keep) < 2:
                raise DatasetError(f"{len(failed)} of {len(images)} image files cannot be read (first: "
                                   f"{next(iter(failed.values()))}); MuSc needs at least 2 readable images")
            subsets = None if subsets is None else _remap_subsets(subsets, keep)
            if local is None:  # one process: unreadable files never reach the backbone
                pixels = pixels[torch.as_tensor(keep, dtype=torch.long)]
        if self.config.compile != "off":
            with timer.stage("compile"):  # reported apart; once per batch size and model
                self.warm_up(pixels, need_cls=need_cls)
        with timer.stage("backbone"):
            tokens, cls = self.extract(pixels, progress=progress, need_cls=need_cls)
            if local is not None:
                tokens = [distributed.gather_batches(t, len(images), c.batch_size) for t in tokens]
                cls = None if cls is None else distributed.gather_batches(cls, len(images), c.batch_size)
                if keep is not None:  # the slots of unreadable files held zeros: drop their tokens
                    sel = torch.as_tensor(keep, dtype=torch.long, device=tokens[0].device)
                    tokens = [t.index_select(0, sel) for t in tokens]
                    cls = None if cls is None else cls.index_select(0, sel.to(cls.device))
        try:
            result = score_features(
                tokens, cls, image_size=c.image_size, r_list=c.r_list, topmin=c.topmin, rscin_k=c.rscin_k,
                compat=c.compat, msm_precision=c.msm_precision, subsets=subsets, device=self.device,
                aligned_window=c.aligned_window, _timer=timer)
        except NonFiniteError as exc:  # name the files, not positions among the readable images
            if paths is None or not exc.indices:
                raise
            idx = [keep[i] for i in exc.indices] if keep is not None else exc.indices
            raise NonFiniteError(f"{exc} (first file: {paths[idx[0]]})", idx) from None
        result.skipped = dict(sorted(failed.items()))
        return result

    def _load_paths(self, paths: list, indices: list[int], progress: bool) -> tuple[torch.Tensor, dict[int, str]]:
        """Decode image files -> (pixels [n, 3, S, S] with zeros for unreadable files, {input index: reason})."""
        from .data import load_images_checked

        size, patch = self.config.image_size, self.backbone.patch_size
        loaded = load_images_checked([str(p) for p in paths], size, self.backbone.preprocess,
                                     num_workers=self.num_workers, progress=progress)
        failed = {indices[k]: msg for k, msg in sorted(loaded.failures.items())}
        tiny = tiny_images(loaded.sizes, patch)
        if tiny:
            w, h = loaded.sizes[tiny[0]].tolist()
            warnings.warn(f"{len(tiny)} image(s) smaller than one {patch}-pixel patch, upsampled to {size}x{size} "
                          f"(their maps carry little detail), first {paths[tiny[0]]} ({w}x{h})", InputWarning,
                          stacklevel=3)
        return loaded.pixels, failed

    def _gather_failures(self, failed: dict[int, str], local: list[int], paths: list) -> dict[int, str]:
        """Every rank's unreadable files (indices; reasons only for this rank's own files)."""
        from . import distributed

        flags = torch.zeros(len(local), dtype=torch.uint8)
        for k, i in enumerate(local):
            flags[k] = int(i in failed)
        every = distributed.gather_batches(flags, len(paths), self.config.batch_size)
        return {i: failed.get(i, f"{paths[i]}: cannot read file (reported by another rank)")
                for i in torch.nonzero(every).flatten().tolist()}


def _preprocess_one(im, index: int, size: int, pp) -> torch.Tensor:
    """One path or PIL image of a mixed list -> [3, S, S]; errors name the item."""
    from PIL import Image

    from .data import preprocess_image
    from .data.loading import READ_ERRORS

    try:
        if isinstance(im, (str, Path)):
            with Image.open(im) as img:
                return preprocess_image(img, size, pp)
        if isinstance(im, Image.Image):
            return preprocess_image(im, size, pp)
    except READ_ERRORS as exc:
        where = im if isinstance(im, (str, Path)) else f"image {index}"
        raise DatasetError(f"{where}: cannot read image ({' '.join(str(exc).split())})") from exc
    raise TypeError(f"image {index}: expected a path or a PIL image, got {type(im).__name__}")


def _remap_subsets(subsets: Sequence[Sequence[int]], keep: list[int]) -> list[list[int]]:
    """Subsets of the input indices -> subsets of the kept images' new indices (empty ones dropped)."""
    new = {old: k for k, old in enumerate(keep)}
    out = [[new[i] for i in s if i in new] for s in subsets]
    return [s for s in out if s]
