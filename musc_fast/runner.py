"""Evaluate MuSc on the categories of a data set: score, measure, write outputs, one category at a time.

Order of work, chosen so that bad input fails early and no finished work is lost:

1. Preflight (nothing scored yet): the options are typed and `out` must be a writable folder
   (RunOptions, `check_output_dir`); every requested category is listed (a missing, empty, one-image or
   path-like category is a DatasetError, which the CLI reports with exit code 2) and the backbone is
   built (unknown name or tag, weights of another architecture, layers out of range, image size not a
   multiple of the patch, r too large for the grid, weights to download while offline: ValueError,
   exit 2); ``divide_num`` must leave 2 images per subset and the largest category must fit the free
   memory (``MuSc.check_memory``), all before an image is read.
2. Per category: the images are scored (unreadable files skipped and listed, or an error with
   ``strict``) and metrics computed; then its old ``result.json`` is removed, ``scores.csv`` and heat
   maps written, ``result.json`` LAST, then the run's ``results.csv``/``results.json`` rewritten. Every
   file is written atomically, so a category is finished exactly when its ``result.json`` exists, and
   a failure before the writes leaves an earlier run's files of that category untouched.
3. ``resume``: a category whose ``result.json`` was written with the same data set, config, heat-map
   mode and input files (names, sizes, modification times) is not scored again; its numbers are read
   back, so the run's results include it.

A category that fails is reported and the others still run (``RunSummary.failures``); an
``OutputError`` (disk full, no permission) stops the run, since later writes would fail too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import engine, outputs, viz
from .checks import InputWarning
from .config import MuScConfig, check_field_types, check_output_dir
from .data import (
    Category,
    DatasetError,
    UnreadableImageError,
    check_mask_sizes,
    divide_indices,
    list_categories,
    load_category,
    load_category_masks,
)
from .pipeline import MuSc, Result

# What the columns of <category>/scores.csv mean (also written into result.json as "scores_columns").
SCORES_COLUMNS = {
    "raw_score": "max of the image's anomaly map (MSM): measured against the other images scored with it "
                 "(its category, or its divide_num subset), so it moves when those images change; not a "
                 "fixed scale across runs or data sets",
    "score": "raw_score after RsCIN, min-max rescaled within the batch (0 = least, 1 = most anomalous image "
             "of the batch): compare it within one run only. For a threshold that holds across runs, score "
             "against a fixed reference bank (musc-fast bank build + musc-fast score, docs/production.md)",
}

# Fields of a category's result.json that are its results (the rest describe the run).
ENTRY_KEYS = ("n_images", "n_defective", "metrics", "timings_ms_per_image", "seconds", "skipped", "warnings",
              "flags")


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
        strict: an unreadable image file stops the run with an error (default: skipped and listed).
        resume: reuse categories finished by an earlier run with the same settings and inputs.
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
    strict: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        # every option checked when the options are made (types from the annotations), before any work
        for name in ("data_path", "out"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_field_types(self)
        if self.vis is not None and self.vis not in viz.VIS_MODES:
            raise ValueError(f"vis must be one of {', '.join(viz.VIS_MODES)} (or null), got {self.vis!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = decode in this process), got {self.num_workers}")


@dataclass
class RunSummary:
    """What a run did. ``failures``/``flagged``: category -> one-line reason; ``resumed``: categories
    read back from an earlier run."""

    root: Path
    per_category: dict[str, dict[str, Any]]
    failures: dict[str, str]
    flagged: dict[str, str] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)

    def metrics_table(self) -> str:
        return outputs.format_table({c: v["metrics"] for c, v in self.per_category.items()})


def resolve_categories(opts: RunOptions) -> list[str]:
    """The categories to run: every one on disk for "all" (case-insensitive), else the names given
    (duplicates dropped, order kept)."""
    if len(opts.categories) == 1 and opts.categories[0].lower() == "all":
        return list_categories(opts.dataset, opts.data_path)
    return list(dict.fromkeys(opts.categories))


def preflight(opts: RunOptions) -> list[Category]:
    """List every requested category before anything is scored. Raises DatasetError (one line) for a
    missing, empty or path-like category, one with fewer than 2 images, or two categories whose output
    folders would coincide."""
    categories = [load_category(opts.dataset, opts.data_path, name) for name in resolve_categories(opts)]
    folders: dict[str, str] = {}
    for c in categories:
        if len(c) < 2:
            raise DatasetError(f"{c.root}: {len(c)} test image(s) in category {c.name!r}; MuSc needs at least 2")
        other = folders.setdefault(outputs.safe_component(c.name), c.name)
        if other != c.name:
            raise DatasetError(f"categories {other!r} and {c.name!r} would share the output folder "
                               f"{outputs.safe_component(c.name)!r}; rename one")
        if opts.strict:  # masks of another size than their image: refused before any work
            check_mask_sizes(c)
    return categories


def check_divide_num(categories: list[Category], divide_num: int) -> None:
    """DatasetError unless ``divide_num`` leaves at least 2 images in every subset of every category
    (MuSc scores the images of a subset against each other)."""
    if divide_num <= 1:
        return
    for c in categories:
        sizes = [len(s) for s in divide_indices(c.samples, divide_num) if s]
        if divide_num > len(c) or min(sizes) < 2:
            raise DatasetError(f"divide_num={divide_num} splits category {c.name!r} ({len(c)} images) into subsets "
                               f"of as few as {min(sizes)} image(s); MuSc needs at least 2 per subset: use "
                               f"--divide-num {max(1, len(c) // 2)} or less")


def input_fingerprint(category: Category, data_root: str | Path) -> str:
    """SHA-256 over what decides a category's results on disk: each sample's image and mask path
    (relative to the data root), label and folder, and each file's size and modification time. A copy
    that changes modification times only makes ``resume`` score again (the safe direction)."""
    root = Path(data_root)
    h = hashlib.sha256(json.dumps([category.has_masks, category.mask_rule, category.has_labels]).encode())
    for s in category.samples:
        row = [s.label, s.defect_type]
        for p in (s.path, s.mask_path):
            if p is None:
                row.append(None)
                continue
            st = os.stat(p)
            row.extend([os.path.relpath(p, root), st.st_size, st.st_mtime_ns])
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def _run_key(opts: RunOptions, config: MuScConfig, fingerprint: str) -> dict[str, Any]:
    key = {"dataset": opts.dataset, "config": config.to_dict(), "vis": opts.vis, "input_fingerprint": fingerprint}
    return json.loads(json.dumps(outputs._jsonable(key)))  # as it reads back from JSON


def finished_entry(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The results stored in a category's ``result.json`` if it was written with ``key`` (data set,
    config, vis, input fingerprint); None when absent, unreadable or written with other settings."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or any(doc.get(k) != v for k, v in key.items()):
        return None
    if any(k not in doc for k in ENTRY_KEYS):
        return None
    return {k: doc[k] for k in ENTRY_KEYS}


def score_category(model: MuSc, category: Category, *, progress: bool = True,
                   on_error: str = "raise") -> Result:
    """MuSc scores of one category, with the original's ``divide_num`` subsets (SPEC 7.4).
    ``on_error="skip"`` leaves unreadable files out (``Result.skipped``, indices into the category)."""
    if len(category) < 2:
        raise DatasetError(f"{category.root}: {len(category)} test image(s); MuSc needs at least 2")
    subsets = None
    if model.config.divide_num > 1:
        subsets = [s for s in divide_indices(category.samples, model.config.divide_num) if s]
    return model.score([str(p) for p in category.paths], subsets=subsets, progress=progress, on_error=on_error)


def without(category: Category, skipped: dict[int, str]) -> Category:
    """The category minus the samples at the ``skipped`` indices."""
    if not skipped:
        return category
    return dataclasses.replace(category, samples=[s for i, s in enumerate(category.samples) if i not in skipped])


def category_metrics(category: Category, result: Result, config: MuScConfig,
                     num_workers: int | None, progress: bool) -> tuple[dict[str, Any], np.ndarray | None]:
    """(metrics in [0, 1] or {} for unlabeled images, masks [N, S, S] bool or None)."""
    from .metrics import compute_metrics

    if not category.has_labels:
        return {}, None
    masks = None
    if category.has_masks:
        masks = load_category_masks(category, config.image_size, threshold=config.mask_threshold,
                                    num_workers=num_workers, progress=progress).numpy()
    labels = np.asarray(category.labels, dtype=np.int64)
    return compute_metrics(labels, result.image_scores, masks, result.anomaly_maps, compat=config.compat), masks


def write_category(root: Path, category: Category, result: Result, masks: np.ndarray | None,
                   vis: str | None) -> None:
    """scores.csv and heat maps of one category (names made safe and unique per folder)."""
    cat_dir = root / outputs.safe_component(category.name)
    outputs.write_csv(
        cat_dir / "scores.csv", ["path", "label", "raw_score", "score"],
        [[str(s.path), s.label, f"{raw:.10g}", f"{fin:.10g}"]
         for s, raw, fin in zip(category.samples, result.raw_image_scores, result.image_scores)])
    if vis is None:
        return
    maps = result.anomaly_maps
    whole = (float(np.nanmin(maps)), float(np.nanmax(maps))) if np.isfinite(maps).any() else (0.0, 0.0)
    todo = viz.maps_to_draw(vis, category.defect_types, category.labels)
    folders = [outputs.safe_component(category.samples[i].defect_type) for i in todo]
    stems: dict[int, str] = {}
    for folder in dict.fromkeys(folders):
        idx = [i for i, f in zip(todo, folders) if f == folder]
        stems.update(zip(idx, outputs.unique_stems([category.samples[i].path for i in idx])))
    with outputs.AtomicBatch() as batch:  # one round of syncs per category, not one per PNG
        for i, folder in zip(todo, folders):
            s = category.samples[i]
            small, full = viz.render(vis, maps, i, s.path, None if masks is None else masks[i],
                                     float(result.image_scores[i]), whole)
            batch.add_png(cat_dir / vis / folder / f"{stems[i]}.png", small)
            batch.add_png(cat_dir / vis / folder / "fullres" / f"{stems[i]}.png", full)


def nonfinite_flags(result: Result) -> list[str]:
    """Why a result's numbers are unusable (only compat mode keeps the original's NaN), else []."""
    flags = []
    bad = int((~np.isfinite(result.image_scores)).sum())
    if bad:
        flags.append(f"{bad} of {len(result)} image scores are not finite (compat mode keeps the original's NaN "
                     "for N <= 4 or constant scores); their metrics are undefined")
    if not np.isfinite(result.anomaly_maps).all():
        flags.append("anomaly maps hold NaN/Inf; pixel metrics are undefined")
    return flags


_PACKAGE = Path(__file__).resolve().parent


@contextmanager
def interrupts_delivered() -> Iterator[None]:
    """Make sure Ctrl-C stops the run. A SIGINT that arrives while Python runs an at-fork callback
    (logging's ``_releaseLock`` after each DataLoader worker fork) or a ``__del__`` raises its
    KeyboardInterrupt there, where Python only prints "Exception ignored in ..." and goes on. Inside
    this block such a swallowed KeyboardInterrupt is delivered again to the main thread shortly after
    (from a timer thread, since a re-raise inside the callback would be swallowed too)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import _thread

    previous = sys.unraisablehook
    _SWALLOWED_INTERRUPT.clear()

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _SWALLOWED_INTERRUPT.set()  # checked between categories and at the end, should the re-delivery be lost
            timer = threading.Timer(0.05, _thread.interrupt_main)
            timer.daemon = True
            timer.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
        raise_if_interrupted()
    finally:
        sys.unraisablehook = previous
        _SWALLOWED_INTERRUPT.clear()


# Set when a KeyboardInterrupt was swallowed inside interrupts_delivered(): the re-delivery from the timer
# can itself land somewhere that swallows or catches it, so the run also checks this flag.
_SWALLOWED_INTERRUPT = threading.Event()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was swallowed (an at-fork callback, a __del__) in this run."""
    if _SWALLOWED_INTERRUPT.is_set():
        raise KeyboardInterrupt


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect musc_fast's own warnings (as one-line strings, deduplicated) instead of printing them;
    other libraries' warnings are passed on once each after the block."""
    from .checks import InputWarning, NonFiniteWarning
    from .memory import MemoryWarning
    from .ops import SmallBatchWarning

    ours = (InputWarning, NonFiniteWarning, MemoryWarning, SmallBatchWarning)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    others = {}
    for w in caught:
        if issubclass(w.category, ours) or _PACKAGE in Path(w.filename).resolve().parents:
            line = " ".join(str(w.message).split())
            if line not in notes:
                notes.append(line)
        else:
            others.setdefault((w.category, str(w.message), w.filename, w.lineno), w)
    for w in others.values():
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _silent(_: str) -> None:
    pass


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def run(config: MuScConfig, opts: RunOptions, *, model: MuSc | None = None,
        log: Callable[[str], None] = print) -> RunSummary:
    """Evaluate every requested category; returns the summary (category failures included, not raised).

    Raises (before anything is scored): DatasetError for bad categories, ValueError for settings the
    backbone cannot honour. During the run: OutputError when a result cannot be written;
    UnreadableImageError with ``strict``; KeyboardInterrupt (finished categories stay written).
    Under torchrun every rank scores (the work is sharded inside) and only the main rank writes.
    """
    with interrupts_delivered():
        return _run(config, opts, model=model, log=log)


def _run(config: MuScConfig, opts: RunOptions, *, model: MuSc | None,
         log: Callable[[str], None]) -> RunSummary:
    from . import distributed

    writer = distributed.is_main_process()
    if not writer:
        log = _silent
    check_output_dir(opts.out)
    root = outputs.run_root(opts.out, opts.dataset, config.backbone, config.image_size)
    categories = preflight(opts)
    check_divide_num(categories, config.divide_num)
    keys = {c.name: _run_key(opts, config, input_fingerprint(c, opts.data_path)) for c in categories}
    done: dict[str, dict[str, Any]] = {}
    if opts.resume:
        for c in categories:
            entry = finished_entry(root / outputs.safe_component(c.name) / "result.json", keys[c.name])
            if distributed.min_over_ranks(int(entry is not None)):  # every rank must agree to skip it
                done[c.name] = entry
    model = model or MuSc(config, num_workers=opts.num_workers)
    run_notes: list[str] = []
    if len(done) < len(categories):
        with captured_warnings() as run_notes:
            _ = model.backbone  # bad backbone settings fail here, before any scoring
            todo = [c for c in categories if c.name not in done]
            biggest = max(todo, key=len)  # even the leanest plan must fit, before the first image is read
            model.check_memory(len(biggest), what=f"category {biggest.name!r}")
        for note in run_notes:
            log(f"warning: {note}")
    per_category: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    flagged: dict[str, str] = {}
    extra = {"dataset": opts.dataset, "data_path": str(opts.data_path), "config": config.to_dict()}

    def save_results() -> None:
        skipped = [{"category": c, **s} for c, v in per_category.items() for s in v.get("skipped", [])]
        outputs.write_results(root, per_category, {**extra, "failures": failures, "flagged": flagged,
                                                   "skipped": skipped, "resumed": list(done),
                                                   "warnings": run_notes}, opts.save_xlsx)

    for category in categories:
        raise_if_interrupted()  # a Ctrl-C swallowed during the last category stops the run here
        name = category.name
        cat_dir = root / outputs.safe_component(name)
        if name in done:
            per_category[name] = done[name]
            if done[name]["flags"]:
                flagged[name] = "; ".join(done[name]["flags"])
            log(f"[{name}] finished by an earlier run with the same settings and inputs: reused (--resume)")
            continue
        t0 = time.perf_counter()
        try:
            with captured_warnings() as notes:
                for note in category.input_notes():  # the reader's remarks: files left out, unofficial names
                    warnings.warn(note, InputWarning, stacklevel=1)
                result = score_category(model, category, progress=opts.progress,
                                        on_error="raise" if opts.strict else "skip")
                scored = without(category, result.skipped)
                flags = nonfinite_flags(result)
                t_metrics = time.perf_counter()
                metrics, masks = category_metrics(scored, result, config, opts.num_workers, opts.progress)
            t_vis = time.perf_counter()
            raise_if_interrupted()  # a Ctrl-C whose re-delivery was lost must not let this category be written
            if writer:
                # the marker goes before its files are replaced: result.json present <=> its files are complete
                outputs.remove_file(cat_dir / "result.json")
                write_category(root, scored, result, masks, opts.vis)
            t_end = time.perf_counter()
        except Exception as exc:
            if isinstance(exc, outputs.OutputError) or (opts.strict and isinstance(exc, UnreadableImageError)):
                raise
            failures[name] = _one_line(exc)
            log(f"[{name}] failed: {failures[name]}")
            if opts.debug:
                log(traceback.format_exc())
            continue
        timings = result.ms_per_image()
        timings["metrics"] = 1e3 * (t_vis - t_metrics) / len(scored)
        timings["outputs"] = 1e3 * (t_end - t_vis) / len(scored)
        entry = {
            "n_images": len(scored),
            "n_defective": int(sum(1 for y in scored.labels if y == 1)),
            "metrics": outputs.as_percent({k: metrics.get(k) for k in outputs.METRIC_COLUMNS}),
            "timings_ms_per_image": timings,
            "seconds": time.perf_counter() - t0,
            "skipped": [{"path": str(category.samples[i].path), "reason": why} for i, why in result.skipped.items()]
            + [{"path": str(p), "reason": f"{p}: not read: {why}"} for p, why in category.left_out.items()],
            "warnings": notes,
            "flags": flags,
        }
        per_category[name] = entry
        plan = engine.summarize(result.plan)  # what ran: mode, provider, precision, chunking per pass
        log(f"[{name}] plan: " + "; ".join(plan))
        for why in result.skipped.values():  # files left out by the reader are summed up in one warning
            log(f"[{name}] skipped: {why}")
        for note in notes:
            log(f"[{name}] warning: {note}")
        if flags:
            flagged[name] = "; ".join(flags)
            log(f"[{name}] FLAGGED: {flagged[name]}")
        if writer:
            outputs.write_json(cat_dir / "result.json", {**extra, **keys[name], **entry, "category": name,
                                                         "scores_columns": SCORES_COLUMNS, "plan": plan})
            save_results()
        shown = ", ".join(f"{k} {v:.2f}" for k, v in entry["metrics"].items() if v is not None)
        log(f"[{name}] {len(scored)} images, {timings['total']:.1f} ms/image (MuSc stages)"
            + (f": {shown}" if shown else ""))
    if writer:  # also after failures, and when every category was reused
        save_results()
    return RunSummary(root, per_category, failures, flagged, list(done))
