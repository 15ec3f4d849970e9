"""CLI pieces for production scoring: ``bank build``, ``bank info`` and ``score``.

``musc_fast.cli`` wires them in::

    add_bank_commands(subparsers)            # after its own sub-commands
    ...
    if getattr(args, "_bank_cmd", None):     # a bank or score command was chosen
        return run_bank_command(args)

Errors are one line on stderr: exit code 2 for bad input, 1 when a file cannot be written.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np


def add_bank_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bank {build,info}`` and ``score`` to an argparse sub-command set."""
    from .config import MuScConfig

    bank = subparsers.add_parser("bank", help="build or inspect a reference bank (score single images)")
    bank_sub = bank.add_subparsers(dest="bank_command", metavar="{build,info}")
    bank_sub.required = True

    build = bank_sub.add_parser("build", help="embed reference images and save them as a bank")
    build.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDER",
                       help="image files and/or folders (searched recursively)")
    build.add_argument("--out", required=True, metavar="BANK.safetensors", help="bank file to write")
    build.add_argument("--preset", choices=MuScConfig.preset_names(), default=None,
                       help="start from a named preset (default: the paper configuration)")
    build.add_argument("--backbone", default=None)
    build.add_argument("--pretrained", default=None, help="weight tag; 'none' for random weights")
    build.add_argument("--weights", default=None, help="local weights file")
    build.add_argument("--image-size", type=int, default=None)
    build.add_argument("--layers", type=int, nargs="+", default=None)
    build.add_argument("--r-list", type=int, nargs="+", default=None)
    build.add_argument("--batch-size", type=int, default=None)
    build.add_argument("--device", default=None)
    build.add_argument("--aligned-window", type=int, default=None,
                       help="aligned parts: search +-W patches around the same position")
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
                       help="append the images judged OK to the bank file (FIFO up to its max size)")
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


def _build_config(args: argparse.Namespace):
    from .config import MuScConfig

    cfg = MuScConfig.preset(args.preset) if args.preset else MuScConfig()
    over = {"backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
            "layers": args.layers, "r_list": args.r_list, "batch_size": args.batch_size,
            "device": args.device, "aligned_window": args.aligned_window}
    over = {k: v for k, v in over.items() if v is not None}
    if args.pretrained is not None:
        over["pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    return dataclasses.replace(cfg, **over)


def _build(args: argparse.Namespace) -> int:
    from .bank import Bank

    if args.max_size is not None and args.max_size < 1:
        raise ValueError(f"--max-size must be >= 1, got {args.max_size}")
    bank = Bank.build(args.images, _build_config(args), max_size=args.max_size, progress=True)
    if args.calibrate:
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
    print(f"leave-one-out scores stored: {'yes' if bank._loo is not None else 'no'}")
    if bank.names:
        print(f"oldest image: {bank.names[0]}\nnewest image: {bank.names[-1]}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .bank import Bank, expand_images
    from .threshold import Threshold

    bank = Bank.load(args.bank)
    if args.device:
        bank = bank.with_config(device=args.device)
    if (args.pixel_threshold is not None or args.pixel_quantile is not None) and \
            args.threshold is None and args.threshold_quantile is None:
        raise ValueError("--pixel-threshold/--pixel-quantile need --threshold or --threshold-quantile")
    if args.add_ok and args.threshold is None and args.threshold_quantile is None:
        raise ValueError("--add-ok needs a threshold to decide which images are OK")
    thr = None
    if args.threshold is not None:
        pixel = args.pixel_threshold
        if args.pixel_quantile is not None:
            pixel = Threshold.from_bank(bank, 1.0, pixel_quantile=args.pixel_quantile).pixel
        thr = Threshold.fixed(args.threshold, pixel)
    elif args.threshold_quantile is not None:
        if bank._loo is None:
            print(f"computing leave-one-out scores of the {len(bank)} bank images "
                  "(store them with `bank build --calibrate`)", file=sys.stderr)
        thr = Threshold.from_bank(bank, args.threshold_quantile, pixel_quantile=args.pixel_quantile,
                                  pixel=args.pixel_threshold)
    items = expand_images(args.images)
    result = bank.score(items, rscin=args.rscin, threshold=thr)
    if thr is not None:
        print(f"threshold: image {thr.image:.6g}, pixel {thr.pixel:.6g} ({thr.source})", file=sys.stderr)
    for i, path in enumerate(items):
        line = f"{path}\t{result.image_scores[i]:.6f}"
        print(line + (f"\t{'NG' if result.labels[i] else 'OK'}" if thr is not None else ""))
    if args.out:
        _write_outputs(Path(args.out), items, result, thr)
    if args.add_ok:
        ok = [p for p, bad in zip(items, result.labels) if not bad]
        if ok:
            evicted = bank.add(ok)
            bank.save(args.bank)
            print(f"added {len(ok)} OK images to {args.bank} (evicted {len(evicted)})", file=sys.stderr)
    return 0


def _write_outputs(out: Path, items: list, result, thr) -> None:
    """scores.csv + one JET heat map per image (+ masks with a threshold), written atomically. Heat-map
    scale: with a threshold [0, 2 x pixel threshold] (the threshold is the middle, green); else the
    min/max over the scored images (the original's ``whole_norm``)."""
    from PIL import Image

    from .outputs import safe_component, write_csv, write_png
    from .viz import jet, normalise

    maps = result.anomaly_maps
    vmin, vmax = (0.0, 2.0 * thr.pixel) if thr is not None else (float(np.min(maps)), float(np.max(maps)))
    header = ["path", "image_score", "raw_image_score"] + (["label"] if thr is not None else [])
    rows = []
    for i, path in enumerate(items):
        row = [str(path), f"{result.image_scores[i]:.8f}", f"{result.raw_image_scores[i]:.8f}"]
        rows.append(row + (["NG" if result.labels[i] else "OK"] if thr is not None else []))
    write_csv(out / "scores.csv", header, rows)
    for i, path in enumerate(items):
        stem = safe_component(f"{i:04d}_{Path(str(path)).stem}")
        write_png(out / "heatmaps" / f"{stem}.png", Image.fromarray(jet(normalise(maps[i], vmin, vmax))))
        if thr is not None:
            write_png(out / "masks" / f"{stem}.png", Image.fromarray(result.masks[i].astype(np.uint8) * 255))
