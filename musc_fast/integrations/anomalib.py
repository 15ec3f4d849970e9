"""anomalib (>= 2.7) models backed by musc_fast: ``MuSc`` (zero-shot, batch) and ``MuScBank`` (few-shot).

>>> from anomalib.data import Folder
>>> from anomalib.engine import Engine
>>> from musc_fast.integrations.anomalib import MuSc
>>> Engine().test(MuSc(preset="offline"), datamodule=Folder(...))

or ``anomalib test --model musc_fast.integrations.anomalib.MuSc --model.preset offline
--data anomalib.data.Folder ...``.

How scoring maps onto anomalib's loop (docs/anomalib.md):

* ``MuSc`` is transductive: at the first test/predict batch of a dataloader it scores **all** of that
  dataloader's images together with ``musc_fast.MuSc.score`` (from the files, when the dataset lists
  ``image_path``, so decoding and resizing are exactly the library's; from the collated tensors
  otherwise), keeps the ``Result`` in ``results[(stage, dataloader_idx)]``, and answers each batch
  from it by image path.
* ``MuScBank`` builds a ``musc_fast.bank.Bank`` from the datamodule's normal training images (or
  ``reference_dir`` / a saved ``bank_path``) in ``setup`` and scores every batch against it with
  ``Bank.score``.
* ``MuScPostProcessor`` turns the raw scores into anomalib's convention: labels and masks from
  thresholds on the raw scores, and ``pred_score`` / ``anomaly_map`` squashed into (0, 1) by a strictly
  increasing map that sends the threshold to 0.5 (anomalib's visualizer and F1 metrics expect that).
  Rankings, hence every AUROC/AP, are unchanged; the raw numbers stay in ``model.results``.

No scoring, preprocessing or metric is re-implemented here: only ``musc_fast.MuSc``, ``Bank`` and the
data readers' ``load_masks`` are called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from torch import nn
from torchvision.transforms.v2 import Resize

from ..bank import Bank
from ..config import MuScConfig
from ..pipeline import MuSc as MuScEngine
from ..pipeline import Result
from ..threshold import Threshold

__all__ = ["MuSc", "MuScBank", "MuScPostProcessor", "squash"]


def config_from(preset: str, **fields: Any) -> MuScConfig:
    """``MuScConfig.preset(preset)`` with the fields that are not None (lists become tuples;
    ``pretrained="none"`` means random weights)."""
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if v is not None}
    if isinstance(overrides.get("pretrained"), str) and overrides["pretrained"].lower() in ("none", "random"):
        overrides["pretrained"] = None
    return MuScConfig.preset(preset, **overrides)


def squash(x: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    """Strictly increasing map of the real line onto (0, 1) with ``threshold -> 0.5``:
    ``0.5 + 0.5 d / (|d| + scale)``, ``d = x - threshold``. Computed in float64; same shape as ``x``."""
    d = x.double() - float(threshold)
    return 0.5 + 0.5 * d / (d.abs() + float(scale))


@dataclass
class Thresholds:
    """Image threshold (on ``pred_score``'s raw scale) and pixel threshold (on the maps' scale)."""

    image: float
    pixel: float
    source: str


class MuScPostProcessor(nn.Module):
    """Our threshold rules in anomalib's output convention.

    Thresholds, in order of precedence: the fixed ``image_threshold`` / ``pixel_threshold`` given here;
    the model's calibrated ones (``MuScBank``: quantiles of the bank's leave-one-out scores,
    ``musc_fast.threshold.Threshold.from_bank``); otherwise the midpoint of the scored set's range
    (anomalib's own fallback when nothing is calibrated): image = (min + max) / 2 of the image scores,
    pixel = (min + max) / 2 of the raw image scores (the map maxima, so a mask is non-empty exactly
    when the map's max is above it).

    ``pred_label = raw score > image threshold``, ``pred_mask = raw map > pixel threshold`` (a value
    equal to the threshold is OK, as in ``musc_fast.threshold``). With ``normalize`` the scores and maps
    are then passed through ``squash`` (threshold -> 0.5, scale = the threshold's magnitude, 1 when 0),
    so that anomalib's 0.5 convention holds; ``normalize=False`` returns the raw values.
    """

    def __init__(self, image_threshold: float | None = None, pixel_threshold: float | None = None,
                 normalize: bool = True) -> None:
        super().__init__()
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.normalize = normalize

    def thresholds(self, image_scores: np.ndarray, raw_scores: np.ndarray,
                   calibrated: Threshold | None = None) -> Thresholds:
        """The thresholds for a scored set: image_scores / raw_scores [N] float."""
        def mid(a: np.ndarray) -> float:
            a = np.asarray(a, dtype=np.float64)
            a = a[np.isfinite(a)]
            return float((a.min() + a.max()) / 2) if a.size else 0.0

        if self.image_threshold is not None:
            image, source = float(self.image_threshold), "fixed"
        elif calibrated is not None:
            image, source = calibrated.image, calibrated.source
        else:
            image, source = mid(image_scores), "midpoint of the set's image scores"
        if self.pixel_threshold is not None:
            pixel = float(self.pixel_threshold)
        elif calibrated is not None and self.image_threshold is None:
            pixel = calibrated.pixel
        else:
            pixel = mid(raw_scores)
        return Thresholds(image, pixel, source)

    @staticmethod
    def _scale(t: float) -> float:
        return abs(t) if t != 0 and math.isfinite(t) else 1.0

    def forward(self, predictions: InferenceBatch, thresholds: Thresholds | None = None) -> InferenceBatch:
        """Raw ``pred_score`` [B] and ``anomaly_map`` [B, S, S] -> labels, masks, (squashed) values.
        Without ``thresholds`` they are taken from this batch alone (``thresholds(...)``)."""
        score, amap = predictions.pred_score, predictions.anomaly_map
        if thresholds is None:
            raw = torch.amax(amap, dim=(-2, -1)).cpu().numpy()
            thresholds = self.thresholds(score.cpu().numpy(), raw)
        label = score > thresholds.image
        mask = amap > thresholds.pixel
        if self.normalize:
            score = squash(score, thresholds.image, self._scale(thresholds.image)).float()
            amap = squash(amap, thresholds.pixel, self._scale(thresholds.pixel)).float()
        return InferenceBatch(pred_score=score, pred_label=label, anomaly_map=amap, pred_mask=mask)


@dataclass
class ScoredSet:
    """One dataloader's images scored together: the Result and where each path sits in it."""

    result: Result
    thresholds: Thresholds | None
    index: dict[str, int] = field(default_factory=dict)
    offset: int = 0  # next row for batches without paths


def _as_list(loaders) -> list:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _dataset_paths(loader) -> list[str] | None:
    """The image paths a dataloader will yield, in order, without decoding anything: anomalib's
    datasets list them in ``samples.image_path``; None when unknown (shuffled or another dataset)."""
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and type(sampler).__name__ != "SequentialSampler":
        return None
    samples = getattr(dataset, "samples", None)
    if samples is not None and "image_path" in getattr(samples, "columns", ()):
        return [str(p) for p in samples["image_path"]]
    files = getattr(dataset, "image_filenames", None)  # anomalib's PredictDataset (Engine.predict(data_path=...))
    return None if files is None else [str(p) for p in files]


class MuSc(AnomalibModule):
    """MuSc zero-shot anomaly detection (ICLR 2024) as an anomalib model, scored by musc_fast.

    Args:
        preset: a ``musc_fast`` preset (``"paper"``, ``"offline"``, a backbone name, ...).
        backbone, pretrained, weights, image_size, layers, r_list, topmin, rscin_k, batch_size,
            divide_num, device, precision, msm_precision, compat, aligned_window: ``MuScConfig`` fields
            overriding the preset (None = the preset's value; ``pretrained="none"`` = random weights).
        image_threshold, pixel_threshold, normalize: see ``MuScPostProcessor``.
        mask_rule: None keeps anomalib's ground-truth masks (nearest-resized, > 0); ``"eq1"`` (MVTec/BTAD)
            or ``"gt0"`` (VisA) replaces them, for batches with ``mask_path``, by the original MuSc's
            masks at S x S (``musc_fast.data.load_masks``), so anomalib's pixel metrics follow the paper's
            protocol.
        num_workers: image-decoding processes of the musc_fast loader (0 = in this process).
        pre_processor, post_processor, evaluator, visualizer: as anomalib's; the default pre-processor
            only resizes to S x S (images stay in [0, 1]: musc_fast normalises them itself), so that
            ``gt_mask`` and ``anomaly_map`` share the S x S grid.
    """

    def __init__(
        self,
        preset: str = "paper",
        backbone: str | None = None,
        pretrained: str | None = None,
        weights: str | None = None,
        image_size: int | None = None,
        layers: list[int] | None = None,
        r_list: list[int] | None = None,
        topmin: list[float] | None = None,
        rscin_k: list[int] | None = None,
        batch_size: int | None = None,
        divide_num: int | None = None,
        device: str | None = None,
        precision: str | None = None,
        msm_precision: str | None = None,
        compat: bool | None = None,
        aligned_window: int | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        normalize: bool = True,
        mask_rule: str | None = None,
        num_workers: int | None = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        config = config_from(
            preset, backbone=backbone, pretrained=pretrained, weights=weights, image_size=image_size, layers=layers,
            r_list=r_list, topmin=topmin, rscin_k=rscin_k, batch_size=batch_size, divide_num=divide_num,
            device=device, precision=precision, msm_precision=msm_precision, compat=compat,
            aligned_window=aligned_window)
        if mask_rule is not None and mask_rule not in ("eq1", "gt0"):
            raise ValueError(f"mask_rule must be None, 'eq1' or 'gt0', got {mask_rule!r}")
        # read by configure_pre_processor / configure_post_processor, which the base __init__ calls
        object.__setattr__(self, "musc_config", config)
        object.__setattr__(self, "_thresholds_args", (image_threshold, pixel_threshold, normalize))
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.model = nn.Identity()  # anomalib expects a .model; the scoring engine below is not an nn.Module
        self.engine = MuScEngine(config, num_workers=num_workers)
        self.mask_rule = mask_rule
        self.results: dict[tuple[str, int], ScoredSet] = {}

    # --- anomalib's model interface -------------------------------------------------------------
    @property
    def learning_type(self) -> LearningType:
        return LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # nothing is trained or calibrated on validation data: skip those batches entirely
        return {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0}

    @staticmethod
    def configure_optimizers() -> None:
        return None

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:
        size = image_size or (self.musc_config.image_size, self.musc_config.image_size)
        return PreProcessor(transform=Resize(size, antialias=True))

    def configure_post_processor(self) -> MuScPostProcessor:
        image_t, pixel_t, normalize = self._thresholds_args
        return MuScPostProcessor(image_t, pixel_t, normalize)

    def training_step(self, batch: Batch, *args, **kwargs) -> None:
        del batch, args, kwargs
        return None

    def validation_step(self, batch: Batch, *args, **kwargs) -> None:
        del batch, args, kwargs  # nothing to calibrate: MuSc needs no normal images
        return None

    def on_test_epoch_start(self) -> None:
        self.results = {k: v for k, v in self.results.items() if k[0] != "test"}

    def on_predict_epoch_start(self) -> None:
        self.results = {k: v for k, v in self.results.items() if k[0] != "predict"}

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        del batch_idx
        pred = self.predict_batch(batch, "test", dataloader_idx)
        if self.mask_rule is not None and batch.gt_mask is not None:
            # the batch's own mask_path is not kept through Lightning's loop: read them from the dataset
            from ..data import load_masks

            masks = self._mask_paths(dataloader_idx)
            paths = [masks.get(str(p)) for p in batch.image_path]
            masks = load_masks(paths, self.musc_config.image_size, self.mask_rule, num_workers=0, progress=False)
            batch.gt_mask = masks.to(pred.anomaly_map.device)
        return batch.update(**pred._asdict())

    def _mask_paths(self, dataloader_idx: int) -> dict[str, str]:
        """image path -> mask path (normal images: absent) of a test dataloader's anomalib dataset."""
        samples = getattr(getattr(self._loader("test", dataloader_idx), "dataset", None), "samples", None)
        if samples is None or "mask_path" not in samples.columns:
            raise RuntimeError("mask_rule needs a dataset that lists mask_path (anomalib's datasets do)")
        return {str(i): str(m) for i, m in zip(samples["image_path"], samples["mask_path"])
                if isinstance(m, str) and m}

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        del batch_idx
        return batch.update(**self.predict_batch(batch, "predict", dataloader_idx)._asdict())

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Score an [B, 3, H, W] tensor of images in [0, 1] together (one set)."""
        del args, kwargs
        result = self.engine.score(batch, progress=False)
        pred = self._raw(result, np.arange(len(result)), batch.device)
        return self.post_processor(pred) if self.post_processor else pred

    # --- scoring --------------------------------------------------------------------------------
    def _loader(self, stage: str, dataloader_idx: int):
        loaders = _as_list(self.trainer.test_dataloaders if stage == "test" else self.trainer.predict_dataloaders)
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None

    def score_set(self, stage: str, dataloader_idx: int) -> ScoredSet:
        """Score the whole dataloader at once (from its paths when the dataset lists them)."""
        loader = self._loader(stage, dataloader_idx)
        paths = _dataset_paths(loader) if loader is not None else None
        if paths is not None:
            result = self.engine.score(paths, progress=False)
        else:
            if loader is None:
                raise RuntimeError("MuSc scores a whole dataloader at once; none is attached to the trainer")
            # the dataset's own items (raw tensors in [0, 1], before the pre-processor), read directly: a
            # second iterator over the loader inside Lightning's loop is not reliable
            dataset = loader.dataset
            images = [dataset[i].image for i in range(len(dataset))]
            result = self.engine.score(torch.stack([im.float() for im in images]), progress=False)
        return self._scored(result, paths)

    def _scored(self, result: Result, paths: Sequence[str] | None, calibrated: Threshold | None = None) -> ScoredSet:
        post = self.post_processor if isinstance(self.post_processor, MuScPostProcessor) else None
        thresholds = post.thresholds(result.image_scores, result.raw_image_scores, calibrated) if post else None
        index: dict[str, int] = {}
        for i, p in enumerate(paths or ()):
            index.setdefault(str(p), i)  # a repeated path answers with its first row
        return ScoredSet(result, thresholds, index)

    def predict_batch(self, batch: Batch, stage: str, dataloader_idx: int = 0) -> InferenceBatch:
        key = (stage, dataloader_idx)
        if key not in self.results:
            self.results[key] = self.score_set(stage, dataloader_idx)
        scored = self.results[key]
        paths = getattr(batch, "image_path", None)
        if scored.index and paths is not None:
            rows = np.array([scored.index[str(p)] for p in paths])
        else:
            rows = np.arange(scored.offset, scored.offset + len(batch.image))
            scored.offset += len(rows)
        return self._finish(scored, rows, batch.image.device)

    def _raw(self, result: Result, rows: np.ndarray, device: torch.device) -> InferenceBatch:
        score = torch.from_numpy(np.ascontiguousarray(result.image_scores[rows])).to(device)
        amap = torch.from_numpy(np.ascontiguousarray(result.anomaly_maps[rows])).to(device)
        return InferenceBatch(pred_score=score, anomaly_map=amap)

    def _finish(self, scored: ScoredSet, rows: np.ndarray, device: torch.device) -> InferenceBatch:
        pred = self._raw(scored.result, rows, device)
        if isinstance(self.post_processor, MuScPostProcessor):
            return self.post_processor(pred, scored.thresholds)
        return self.post_processor(pred) if self.post_processor else pred


class MuScBank(MuSc):
    """Few-shot MuSc: new images are scored against a bank of normal images (``musc_fast.bank.Bank``),
    one at a time if need be (a production line).

    The bank comes from, in order: ``bank_path`` (a saved bank), ``reference_dir`` (images or folders),
    or the datamodule's training images (anomalib's train split holds normal images only), collected
    in ``setup`` (called by ``Engine.fit``/``test``/``predict``) or by ``fit_bank`` directly.

    Args:
        reference_dir: images or a folder of normal images for the bank.
        bank_path: a bank saved with ``Bank.save`` (its config wins over the preset).
        quantile: the image threshold is this quantile of the bank's leave-one-out scores (pixel
            threshold: the same value, ``Threshold.from_bank``), unless ``image_threshold`` is fixed.
        max_size: keep at most this many bank images.
        **kwargs: as ``MuSc`` (preset, MuScConfig fields, thresholds, ...).
    """

    def __init__(self, reference_dir: str | None = None, bank_path: str | None = None, quantile: float = 0.99,
                 max_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference_dir = reference_dir
        self.bank_path = bank_path
        self.quantile = quantile
        self.max_size = max_size
        self.bank: Bank | None = None
        self.calibrated: Threshold | None = None

    @property
    def learning_type(self) -> LearningType:
        return LearningType.FEW_SHOT

    def setup(self, stage: str) -> None:
        del stage
        if self.bank is not None:
            return
        if self.bank_path:
            self.use_bank(Bank.load(self.bank_path))
        elif self.reference_dir:
            self.fit_bank(self.reference_dir)
        else:
            self.fit_bank(self._train_paths())

    def _train_paths(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise RuntimeError("MuScBank needs normal images: pass reference_dir or bank_path, or a datamodule "
                               "with a training split")
        if not getattr(datamodule, "_is_setup", True):
            datamodule.setup()
        paths = _dataset_paths(datamodule.train_dataloader())
        if paths is None:
            samples = datamodule.train_data.samples
            paths = [str(p) for p in samples["image_path"]]
        return paths

    def fit_bank(self, images) -> Bank:
        """Build the bank from normal images (paths, folders, PIL images or a [M, 3, H, W] tensor)."""
        bank = Bank.build(images, model=self.engine, max_size=self.max_size, progress=False)
        return self.use_bank(bank)

    def use_bank(self, bank: Bank) -> Bank:
        self.bank = bank
        if bank.config != self.engine.config:
            self.engine = bank.model()
            object.__setattr__(self, "musc_config", bank.config)
        self.calibrated = Threshold.from_bank(bank, self.quantile) if len(bank) >= 2 else None
        self.results = {}
        return bank

    def predict_batch(self, batch: Batch, stage: str, dataloader_idx: int = 0) -> InferenceBatch:
        del stage, dataloader_idx
        if self.bank is None:
            self.setup("test")
        paths = getattr(batch, "image_path", None)
        items = [str(p) for p in paths] if paths is not None else batch.image.float().cpu()
        result = self.bank.score(items, model=self.engine)
        key = ("bank", len(self.results))
        self.results[key] = scored = self._scored(result, items if paths is not None else None, self.calibrated)
        return self._finish(scored, np.arange(len(result)), batch.image.device)
