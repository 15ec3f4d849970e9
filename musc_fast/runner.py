"""Evaluate MuSc on the categories of a data set: score, measure, write outputs, one category at a time.

Each category's files are written as soon as it finishes; a category that fails is reported and the
others still run (``RunSummary.failures``).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import outputs, viz
from .config import MuScConfig
from .data import Category, DatasetError, divide_indices, list_categories, load_category, load_masks
from .pipeline import MuSc, Result


@dataclass
class RunOptions:
    """What to evaluate and where results go (the model settings are in ``MuScConfig``).

    Attributes:
        dataset: reader name (``musc_fast.data.available()``).
        data_path: the data set's root folder.
        categories: category names, or ``["all"]``.
        out: output root; files go to ``<out>/<dataset>/<backbone>/imagesize<S>/``.
        vis: heat-map mode (``viz.VIS_MODES``) or None for no pictures.
        save_xlsx: also write the original's results.xlsx.
        num_workers: image-decoding processes (None = default).
        progress: show progress bars.
        debug: keep full tracebacks of failed categories in the log.
    """

    dataset: str
    data_path: str
    categories: list[str] = field(default_factory=lambda: ["all"])
    out: str = "output"
    vis: str | None = None
    save_xlsx: bool = False
    num_workers: int | None = None
    progress: bool = True
    debug: bool = False


@dataclass
class RunSummary:
    root: Path
    per_category: dict[str, dict[str, Any]]
    failures: dict[str, str]

    def metrics_table(self) -> str:
        return outputs.format_table({c: v["metrics"] for c, v in self.per_category.items()})


def resolve_categories(opts: RunOptions) -> list[str]:
    """The categories to run: every one on disk for "all" (case-insensitive), else the names given."""
    if len(opts.categories) == 1 and opts.categories[0].lower() == "all":
        return list_categories(opts.dataset, opts.data_path)
    return list(opts.categories)


def score_category(model: MuSc, category: Category, *, progress: bool = True) -> Result:
    """MuSc scores of one category, with the original's ``divide_num`` subsets (SPEC 7.4)."""
    if len(category) < 2:
        raise DatasetError(f"{category.root}: {len(category)} test image(s); MuSc needs at least 2")
    subsets = None
    if model.config.divide_num > 1:
        subsets = [s for s in divide_indices(category.samples, model.config.divide_num) if s]
    return model.score([str(p) for p in category.paths], subsets=subsets, progress=progress)


def category_metrics(category: Category, result: Result, config: MuScConfig,
                     num_workers: int | None, progress: bool) -> tuple[dict[str, Any], np.ndarray | None]:
    """(metrics in [0, 1] or {} for unlabeled images, masks [N, S, S] bool or None)."""
    from .metrics import compute_metrics

    if not category.has_labels:
        return {}, None
    masks = None
    if category.has_masks:
        masks = load_masks(category.mask_paths, config.image_size, category.mask_rule,
                           num_workers=num_workers, progress=progress).numpy()
    labels = np.asarray(category.labels, dtype=np.int64)
    return compute_metrics(labels, result.image_scores, masks, result.anomaly_maps, compat=config.compat), masks


def write_category(root: Path, category: Category, result: Result, masks: np.ndarray | None,
                   vis: str | None) -> None:
    """scores.csv and heat maps of one category."""
    cat_dir = root / outputs.safe_component(category.name)
    outputs.write_csv(
        cat_dir / "scores.csv", ["path", "label", "raw_score", "score"],
        [[str(s.path), s.label, f"{raw:.10g}", f"{fin:.10g}"]
         for s, raw, fin in zip(category.samples, result.raw_image_scores, result.image_scores)])
    if vis is None:
        return
    maps = result.anomaly_maps
    whole = (float(maps.min()), float(maps.max()))
    for i in viz.maps_to_draw(vis, category.defect_types, category.labels):
        s = category.samples[i]
        small, full = viz.render(vis, maps, i, s.path, None if masks is None else masks[i],
                                 float(result.image_scores[i]), whole)
        folder = cat_dir / vis / outputs.safe_component(s.defect_type)
        stem = outputs.safe_component(s.path.stem)
        outputs.write_png(folder / f"{stem}.png", small)
        outputs.write_png(folder / "fullres" / f"{stem}.png", full)


def _silent(_: str) -> None:
    pass


def run(config: MuScConfig, opts: RunOptions, *, model: MuSc | None = None,
        log: Callable[[str], None] = print) -> RunSummary:
    """Evaluate every requested category; returns the summary (failures included, never raised).

    Under torchrun every rank scores (the work is sharded inside) and only the main rank writes.
    """
    from . import distributed

    writer = distributed.is_main_process()
    if not writer:
        log = _silent
    model = model or MuSc(config, num_workers=opts.num_workers)
    root = outputs.run_root(opts.out, opts.dataset, config.backbone, config.image_size)
    names = resolve_categories(opts)
    per_category: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    extra = {"dataset": opts.dataset, "data_path": str(opts.data_path), "config": config.to_dict()}
    for name in names:
        t0 = time.perf_counter()
        try:
            category = load_category(opts.dataset, opts.data_path, name)
            result = score_category(model, category, progress=opts.progress)
            t_metrics = time.perf_counter()
            metrics, masks = category_metrics(category, result, config, opts.num_workers, opts.progress)
            t_vis = time.perf_counter()
            if writer:
                write_category(root, category, result, masks, opts.vis)
            t_end = time.perf_counter()
        except (DatasetError, ValueError, OSError, RuntimeError) as exc:
            failures[name] = " ".join(str(exc).split()) or type(exc).__name__
            log(f"[{name}] failed: {failures[name]}")
            if opts.debug:
                log(traceback.format_exc())
            continue
        timings = result.ms_per_image()
        timings["metrics"] = 1e3 * (t_vis - t_metrics) / len(category)
        timings["outputs"] = 1e3 * (t_end - t_vis) / len(category)
        entry = {
            "n_images": len(category),
            "n_defective": int(sum(1 for y in category.labels if y == 1)),
            "metrics": outputs.as_percent({k: metrics.get(k) for k in outputs.METRIC_COLUMNS}),
            "timings_ms_per_image": timings,
            "seconds": time.perf_counter() - t0,
        }
        per_category[name] = entry
        if writer:
            outputs.write_json(root / outputs.safe_component(name) / "result.json", {**extra, **entry})
            outputs.write_results(root, per_category, {**extra, "failures": failures}, opts.save_xlsx)
        shown = ", ".join(f"{k} {v:.2f}" for k, v in entry["metrics"].items() if v is not None)
        log(f"[{name}] {len(category)} images, {timings['total']:.1f} ms/image (MuSc stages)"
            + (f": {shown}" if shown else ""))
    if failures and writer:  # the last write may predate a later failure
        outputs.write_results(root, per_category, {**extra, "failures": failures}, opts.save_xlsx)
    return RunSummary(root, per_category, failures)
