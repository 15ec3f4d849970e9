"""The engine: extract -> aggregate (LNAMD) -> mutual score (MSM) -> maps -> image scores -> RsCIN.

``score_features`` is everything after the backbone, for frontends that bring their own features;
``MuSc`` adds preprocessing and the backbone. Every stage is timed (``Result.timings``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import ops
from .backbones import Backbone, build_backbone
from .config import MuScConfig
from .ops.boxgram import mutual_scores_multi, use_boxgram
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
    """

    image_scores: np.ndarray
    raw_image_scores: np.ndarray
    patch_scores: np.ndarray
    anomaly_maps: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    labels: np.ndarray | None = None
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_scores)

    def ms_per_image(self) -> dict[str, float]:
        """``timings`` divided by the number of images, plus their ``total``."""
        n = max(len(self), 1)
        per = {k: v / n for k, v in self.timings.items()}
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
    timer = _timer or _Timer(dev)
    # --- production (memory plan, aligned window, distributed): see musc_fast.memory ---
    from . import distributed
    from . import memory as mem

    if memory is None:
        budget = distributed.min_over_ranks(mem.budget_for(dev))  # ranks must agree on the blocks
        memory = mem.plan_scoring(max(len(i) for i in groups), length, tokens[0].shape[2],
                                  n_r=len(r_list), topmin=topmin, device=dev, budget=budget)
    r_groups = [list(r_list)] if memory.lnamd_all_r else [[r] for r in r_list]

    acc = torch.zeros((n, length), dtype=torch.float64, device=dev)
    n_passes = len(tokens) * len(r_list)
    torch_msm = ops.backend("msm", dev) == "torch" and aligned_window is None
    for idx in groups:
        index = torch.as_tensor(idx, device=dev)
        whole = idx == list(range(n))  # no copy of the tokens when all images score together
        for layer in tokens:
            sub = layer.to(dev) if whole else layer.to(dev).index_select(0, index)
            c = layer.shape[2]
            one_gram = torch_msm and use_boxgram(dev, c) and mem.fits_one_gram(memory, len(idx), length, c,
                                                                                len(r_list))
            if one_gram:  # every r of the layer from one Gram block per pair (ops/boxgram.py)
                with timer.stage("lnamd"):
                    normed = layer_norm_chw(sub)
                with timer.stage("msm"):
                    acc[index] += mutual_scores_multi(normed, list(r_list), topmin, compat=compat,
                                                      precision=msm_precision,
                                                      block_elems=memory.block_elems).sum(0)
                del normed, sub
                continue
            for rs in r_groups:
                with timer.stage("lnamd"):
                    zs = mem.lnamd_planned(sub, rs, memory)
                for z in zs:
                    with timer.stage("msm"):
                        acc[index] += mem.score_pass(z, topmin, compat=compat, precision=msm_precision,
                                                     plan=memory, window=aligned_window)
                del zs
            del sub
    patch = acc / n_passes

    with timer.stage("maps"):
        maps, raw = ops.maps_and_image_scores(patch.view(n, g, g), image_size, chunk=memory.map_chunk)
    with timer.stage("rscin"):
        if cls_tokens is None or 0 in tuple(rscin_k):
            final = raw.numpy().copy()
        else:
            final = ops.rscin(raw.numpy(), cls_tokens, tuple(rscin_k), compat=compat)
    return Result(
        image_scores=final,
        raw_image_scores=raw.numpy(),
        patch_scores=patch.view(n, g, g).cpu().numpy(),
        anomaly_maps=maps.numpy(),
        timings=dict(timer.ms),
    )


ImageInput = Sequence[str | Path] | Sequence["PIL.Image.Image"] | torch.Tensor  # noqa: F821


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

    # --- model -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        p = self.config.precision
        if p == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[p]

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            c = self.config
            self._backbone = build_backbone(
                c.backbone, pretrained=c.pretrained, weights=c.weights, image_size=c.image_size,
                layers=c.layers, quick_gelu=c.quick_gelu, compat=c.compat, device=self.device,
                dtype=self.dtype)
        return self._backbone

    # --- stages ----------------------------------------------------------------------------------
    def preprocess(self, images: ImageInput, *, progress: bool = True) -> torch.Tensor:
        """Images -> [N, 3, S, S] float32 on the CPU, normalised for the backbone (SPEC 1.2).

        Paths and PIL images go through PIL exactly as the original (squash resize, bicubic for CLIP,
        bilinear for DINO). A tensor is taken as RGB in [0, 1] ([N, 3, H, W], like ToTensor's output)
        and resized with torch's antialiased interpolation when H, W differ from S.
        """
        from .data import load_images, preprocess_image

        size, pp = self.config.image_size, self.backbone.preprocess
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"an image tensor must be [N, 3, H, W], got {tuple(images.shape)}")
            x = images.float().cpu()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode=pp.interpolation, antialias=True,
                                  align_corners=False)
            mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
            std = torch.tensor(pp.std).view(1, 3, 1, 1)
            return (x - mean) / std
        images = list(images)
        if images and all(isinstance(im, (str, Path)) for im in images):
            return load_images([str(p) for p in images], size, pp, num_workers=self.num_workers,
                               progress=progress)
        return torch.stack([preprocess_image(im, size, pp) for im in images])

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
        model, bs = self.backbone, self.config.batch_size
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
              progress: bool = True) -> Result:
        """Score images of one category against each other.

        Args:
            images: a list of paths, a list of PIL images, or an [N, 3, H, W] tensor in [0, 1].
            subsets: disjoint index lists scored separately (default: ``divide_num`` subsets, which
                group by parent folder and so need paths, or all images together).
        """
        c = self.config
        timer = _Timer(self.device)
        from . import distributed

        # under torch.distributed each rank decodes and embeds its share of the batches
        local = distributed.local_indices(len(images), c.batch_size)
        with timer.stage("load"):
            pixels = self.preprocess(images if local is None else distributed.select(images, local),
                                     progress=progress)
        if subsets is None and c.divide_num > 1:
            if isinstance(images, torch.Tensor) or not all(isinstance(p, (str, Path)) for p in images):
                raise ValueError("divide_num > 1 groups images by their parent folder and needs image paths")
            from .data.divide import divide_indices

            subsets = divide_indices([str(p) for p in images], c.divide_num)
        need_cls = 0 not in c.rscin_k
        with timer.stage("backbone"):
            tokens, cls = self.extract(pixels, progress=progress, need_cls=need_cls)
            if local is not None:
                tokens = [distributed.gather_batches(t, len(images), c.batch_size) for t in tokens]
                cls = None if cls is None else distributed.gather_batches(cls, len(images), c.batch_size)
        return score_features(
            tokens, cls, image_size=c.image_size, r_list=c.r_list, topmin=c.topmin, rscin_k=c.rscin_k,
            compat=c.compat, msm_precision=c.msm_precision, subsets=subsets, device=self.device,
            aligned_window=c.aligned_window, _timer=timer)
