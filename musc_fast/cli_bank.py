"""CLI pieces for production scoring: ``bank build``, ``bank info`` and ``score``.

``musc_fast.cli`` wires them in::

    add_bank_commands(subparsers)            # after its own sub-commands
    ...
    if getattr(args, "_bank_cmd", None):     # a bank or score command was chosen
        return run_bank_command(args)

Errors are one line on stderr: exit code 2 for bad input, 1 when a file cannot be written.

``score`` skips unreadable image files and lists them (stderr, and ``skipped.csv`` under ``--out``;
``--strict``: the first one is an error, exit 2), shows a progress bar (``--no-progress``), and writes
its results as it goes: a stdout line per image and ``scores.csv.partial`` rows per chunk (flushed and
fsynced), renamed to ``scores.csv`` when the call finishes, so a crash keeps the finished rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# `bank build`'s own YAML keys, beside the MuScConfig fields it offers (``config.config_fields``).
BUILD_KEYS = ("preset", "max_size", "calibrate")


def add_bank_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bank {build,info}`` and ``score`` to an argparse sub-command set."""
    from .config import MuScConfig, add_config_arguments

    bank = subparsers.add_parser("bank", help="build or inspect a reference bank (score single images)")
    bank_sub = bank.add_subparsers(dest="bank_command", metavar="{build,info}")
    bank_sub.required = True

    build = bank_sub.add_parser("build", help="embed reference images and save them as a bank")
    build.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDER",
                       help="image files and/or folders (searched recursively)")
    build.add_argument("--out", required=True, metavar="BANK.safetensors", help="bank file to write")
    build.add_argument("--config", default=None, metavar="YAML",
                       help="YAML file with the same keys as the flags (flags win)")
    build.add_argument("--preset", choices=MuScConfig.preset_names(), default=None,
                       help="start from a named preset (default: the --backbone's own preset, as `run`, "
                            "else the paper configuration)")
    add_config_arguments(build, "bank build")  # one flag per MuScConfig field a bank uses; absent unless given
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--max-size", type=int, default=None,
                       help="keep at most this many images (the last ones; later additions evict FIFO)")
    build.add_argument("--calibrate", action="store_true",
                       help="also compute and store the leave-one-out scores (for --threshold-quantile)")
    build.set_defaults(_bank_cmd="build")

    info = bank_sub.add_parser("info", help="print what a bank holds")
    info.add_argument("bank", metavar="BANK.safetensors")
    info.set_defaults(_bank_cmd="info")

    score = subparsers.add_parser("score", help="score images against a reference bank")
    score.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders")
    score.add_argument("--bank", required=True, metavar="BANK.safetensors")
    thr = score.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=float, default=None, metavar="VALUE",
                     help="NG when the image score is above VALUE")
    thr.add_argument("--threshold-quantile", type=float, default=None, metavar="Q",
                     help="threshold = the Q-quantile of the bank's leave-one-out image scores")
    pix = score.add_mutually_exclusive_group()
    pix.add_argument("--pixel-threshold", type=float, default=None, metavar="VALUE",
                     help="mask threshold (default: the image threshold)")
    pix.add_argument("--pixel-quantile", type=float, default=None, metavar="Q",
                     help="mask threshold = the Q-quantile of the leave-one-out map pixels")
    score.add_argument("--out", default=None, metavar="DIR",
                       help="write scores.csv, heat maps (and masks with a threshold) here")
    score.add_argument("--device", default=None)
    score.add_argument("--rscin", action="store_true",
                       help="re-score with RsCIN over bank + new images (fixed thresholds only)")
    score.add_argument("--add-ok", action="store_true",
                       help="append the images judged OK to the bank file (FIFO up to its max size); images "
                            "already in the bank are skipped; stored calibration is recomputed")
    score.add_argument("--strict", action="store_true",
                       help="an unreadable image file is an error (exit 2) instead of being skipped and listed")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.add_argument("--chunk", type=int, default=64, metavar="N",
                       help="images decoded, embedded and written at once (default 64)")
    score.set_defaults(_bank_cmd="score")


def run_bank_command(args: argparse.Namespace) -> int:
    """Run the command chosen by ``add_bank_commands``; returns the exit code (2 on errors)."""
    from .bank import BankError
    from .data.base import DatasetError
    from .outputs import OutputError

    handlers = {"build": _build, "info": _info, "score": _score}
    try:
        return handlers[args._bank_cmd](args)
    except OutputError as exc:  # disk full, no permission: not an input error
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except (BankError, DatasetError, ValueError, TypeError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2


def _build_settings(args: argparse.Namespace) -> dict:
    """The YAML ``--config`` (if any) overridden by the flags that were given; values type-checked."""
    from .config import check_type, config_fields, given_config_settings, none_tag, read_settings_yaml

    fields = tuple(name for name, _ in config_fields("bank build"))
    config = getattr(args, "config", None)
    settings = read_settings_yaml(config, BUILD_KEYS + fields, "bank build") if config else {}
    if isinstance(settings.get("pretrained"), str):
        settings["pretrained"] = none_tag(settings["pretrained"])
    for key in BUILD_KEYS:
        value = getattr(args, key, None)
        if value is not None and value is not False:  # given on the command line
            settings[key] = value
    settings.update(given_config_settings(args, "bank build"))
    for key, tp in (("preset", str), ("max_size", int), ("calibrate", bool)):
        if settings.get(key) is not None:
            check_type(key, settings[key], tp)
    return settings


def _build_config(args: argparse.Namespace, settings: dict | None = None):
    """The MuScConfig: base preset (explicit, or the backbone's own, or "paper") + the given fields."""
    from .config import MuScConfig, field_names, preset_for_backbone

    settings = _build_settings(args) if settings is None else settings
    preset = settings.get("preset") or preset_for_backbone(settings.get("backbone"))  # as `run`
    return MuScConfig.preset(preset, **{k: v for k, v in settings.items() if k in field_names()})


def _build(args: argparse.Namespace) -> int:
    from .bank import Bank

    settings = _build_settings(args)
    max_size = settings.get("max_size")
    if max_size is not None and max_size < 1:
        raise ValueError(f"--max-size must be >= 1, got {max_size}")
    bank = Bank.build(args.images, _build_config(args, settings), max_size=max_size, progress=not args.no_progress)
    if settings.get("calibrate"):
        bank.leave_one_out()
    path = bank.save(args.out)
    print(f"wrote {path}: {bank!r}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .bank import Bank

    bank = Bank.load(args.bank)
    c = bank.config
    print(repr(bank))
    print(f"backbone {c.backbone} ({c.pretrained or c.weights or 'random'}), image size {c.image_size}, "
          f"layers {list(c.layers)}, r {list(c.r_list)}, token dtype {bank.tokens[0].dtype}")
    print(f"leave-one-out scores stored: {'yes' if bank.has_calibration else 'no'}")
    if bank.names:
        print(f"oldest image: {bank.names[0]}\nnewest image: {bank.names[-1]}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .bank import Bank, expand_images
    from .threshold import Threshold

    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    bank = Bank.load(args.bank)
    if args.device:
        bank = bank.with_config(device=args.device)
    if (args.pixel_threshold is not None or args.pixel_quantile is not None) and \
            args.threshold is None and args.threshold_quantile is None:
        raise ValueError("--pixel-threshold/--pixel-quantile need --threshold or --threshold-quantile")
    if args.add_ok and args.threshold is None and args.threshold_quantile is None:
        raise ValueError("--add-ok needs a threshold to decide which images are OK")
    if args.rscin and args.threshold_quantile is not None:
        raise ValueError("--threshold-quantile is on the raw score scale; with --rscin use --threshold")
    items = expand_images(args.images)  # a missing file or empty folder fails before the calibration
    thr = None
    if args.threshold is not None:
        pixel = args.pixel_threshold
        if args.pixel_quantile is not None:
            pixel = Threshold.from_bank(bank, 1.0, pixel_quantile=args.pixel_quantile).pixel
        thr = Threshold.fixed(args.threshold, pixel)
    elif args.threshold_quantile is not None:
        if not bank.has_calibration:
            print(f"computing leave-one-out scores of the {len(bank)} bank images "
                  "(store them with `bank build --calibrate`)", file=sys.stderr)
        thr = Threshold.from_bank(bank, args.threshold_quantile, pixel_quantile=args.pixel_quantile,
                                  pixel=args.pixel_threshold)
    if thr is not None:
        print(f"threshold: image {thr.image:.6g}, pixel {thr.pixel:.6g} ({thr.source})", file=sys.stderr)
    sink = _ScoreSink(Path(args.out) if args.out else None, items, thr)
    try:
        result = bank.score(items, rscin=args.rscin, threshold=thr, progress=not args.no_progress,
                            on_error="raise" if args.strict else "skip", on_chunk=sink.chunk,
                            chunk=args.chunk)
    except BaseException:
        sink.abort()
        raise
    for why in result.skipped.values():
        print(f"skipped: {why}", file=sys.stderr)
    sink.finish(result)
    if result.skipped:
        print(f"skipped {len(result.skipped)} of {len(items)} images (unreadable)"
              + (f"; listed in {Path(args.out) / 'skipped.csv'}" if args.out else ""), file=sys.stderr)
    if args.add_ok:
        _add_ok(bank, args.bank, [items[i] for i, bad in zip(sink.indices, result.labels) if not bad])
    return 0


def _add_ok(bank, bank_path: str, ok: list) -> None:
    """Append the OK images that are not in the bank yet; keep the calibration the bank had valid."""
    if not ok:
        return
    dups = bank.duplicates(ok)
    for i, same in dups.items():
        print(f"not added (already in the bank): {ok[i]} (same content as {same})", file=sys.stderr)
    new = [p for i, p in enumerate(ok) if i not in dups]
    if not new:
        return
    calibrated = bank.has_calibration  # stored in the file, or computed by this call's threshold
    evicted = bank.add(new, skip_duplicates=False)
    if calibrated:  # every leave-one-out score changes with the contents: recompute, then store it
        print(f"recomputing the leave-one-out calibration of the {len(bank)} bank images", file=sys.stderr)
        bank.leave_one_out()
    bank.save(bank_path)
    print(f"added {len(new)} OK images to {bank_path} (evicted {len(evicted)})", file=sys.stderr)


class _ScoreSink:
    """Writes results as chunks are scored: a stdout line per image, ``scores.csv.partial`` rows
    (flushed and fsynced per chunk), heat maps and masks when a threshold fixes their scale; at the end
    the heat maps of a threshold-free call (scaled to the min/max of all maps), ``skipped.csv`` and the
    rename of ``scores.csv.partial`` to ``scores.csv``. After a failure the partial file stays."""

    def __init__(self, out: Path | None, items: list, thr):
        self.out, self.items, self.thr = out, items, thr
        self.indices: list[int] = []
        self.fh = None
        if out is None:
            return
        import csv

        from .outputs import OutputError

        try:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("scores.csv", "skipped.csv"):  # no stale results of an earlier call beside new ones
                (out / name).unlink(missing_ok=True)
            self.partial = out / "scores.csv.partial"
            self.fh = open(self.partial, "w", newline="")
            self.csv = csv.writer(self.fh, lineterminator="\n")
            self.csv.writerow(["path", "image_score", "raw_image_score"] + (["label"] if thr is not None else []))
            self._sync()
        except OSError as exc:
            raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from exc

    def _sync(self) -> None:
        import os

        self.fh.flush()
        os.fsync(self.fh.fileno())

    def chunk(self, res, indices: list[int]) -> None:
        from .outputs import OutputError

        rows = []
        for k, i in enumerate(indices):
            path = self.items[i]
            label = [] if self.thr is None else ["NG" if res.labels[k] else "OK"]
            print("\t".join([str(path), f"{res.image_scores[k]:.6f}", *label]), flush=True)
            rows.append([str(path), f"{res.image_scores[k]:.8f}", f"{res.raw_image_scores[k]:.8f}", *label])
        self.indices += indices
        if self.fh is None:
            return
        try:
            self.csv.writerows(rows)
            self._sync()
            if self.thr is not None:
                _write_maps(self.out, self.items, indices, res, (0.0, 2.0 * self.thr.pixel), masks=True)
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot write ({exc.strerror or exc})") from exc

    def abort(self) -> None:
        if self.fh is None:
            return
        self.fh.close()
        print(f"scoring stopped: the {len(self.indices)} finished rows are in {self.partial}", file=sys.stderr)

    def finish(self, result) -> None:
        import os

        from .outputs import OutputError, write_csv

        if self.fh is None:
            return
        try:
            self.fh.close()
            if self.thr is None:  # the heat-map scale is the min/max over every map: known only now
                maps = result.anomaly_maps
                _write_maps(self.out, self.items, self.indices, result,
                            (float(np.min(maps)), float(np.max(maps))), masks=False)
            write_csv(self.out / "skipped.csv", ["path", "reason"],
                      [[str(self.items[i]), why] for i, why in result.skipped.items()])
            os.replace(self.partial, self.out / "scores.csv")
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write ({exc.strerror or exc})") from exc


def _write_maps(out: Path, items: list, indices: list[int], res, scale: tuple[float, float], *,
                masks: bool) -> None:
    """One JET heat map per image (+ masks), named by the input index and stem. Scale: with a threshold
    [0, 2 x pixel threshold] (the threshold is the middle, green); else the min/max over the scored
    images (the original's ``whole_norm``)."""
    from PIL import Image

    from .outputs import safe_component, write_png
    from .viz import jet, normalise

    for k, i in enumerate(indices):
        stem = safe_component(f"{i:04d}_{Path(str(items[i])).stem}")
        write_png(out / "heatmaps" / f"{stem}.png", Image.fromarray(jet(normalise(res.anomaly_maps[k], *scale))))
        if masks:
            write_png(out / "masks" / f"{stem}.png", Image.fromarray(res.masks[k].astype(np.uint8) * 255))
