"""CLI: ``musc-fast export`` (a bank -> a model folder) and ``musc-fast predict`` (run a model folder).

``predict`` runs without torch (``musc_fast.deploy``). Errors are one line on stderr: exit 2 for bad
input (a missing or edited model file, a model of another format version, an unreadable image), 1 when
an output cannot be written. ``predict`` checks every image path before scoring and prints one CSV
line per image as soon as it is scored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE, EXIT_FAILED = 2, 1


def add_export_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``predict`` to the ``musc-fast`` sub-commands."""
    ex = subparsers.add_parser("export", help="export a bank as one ONNX / OpenVINO model (docs/deploy.md)")
    ex.add_argument("--bank", required=True, metavar="BANK.safetensors", help="bank file (musc-fast bank build)")
    ex.add_argument("--format", choices=("onnx", "openvino"), default="onnx", dest="model_format")
    ex.add_argument("--out", required=True, metavar="DIR", help="model folder to write (replaced if it holds a model)")
    ex.add_argument("--fp16", action="store_true", help="store weights and bank features in float16 (half size)")
    ex.add_argument("--threshold-quantile", type=float, default=0.99, metavar="Q",
                    help="image threshold = the Q-quantile of the bank's leave-one-out scores (default 0.99)")
    ex.add_argument("--pixel-quantile", type=float, default=None, metavar="Q",
                    help="pixel threshold = the Q-quantile of the leave-one-out map pixels (default: image threshold)")
    ex.add_argument("--external-data", action="store_true",
                    help="ONNX: constants in model.onnx.data (automatic over 2 GB)")
    ex.set_defaults(_handler=run_export_command)

    pr = subparsers.add_parser("predict", help="score images with an exported model folder (no torch needed)")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--model", required=True, metavar="DIR", help="folder written by musc-fast export")
    pr.add_argument("--runtime", choices=("auto", "onnxruntime", "openvino"), default="auto")
    pr.add_argument("--normalize", action="store_true", help="scores in [0, 1] with the threshold at 0.5")
    pr.add_argument("--cache-dir", default=None, metavar="DIR", help="OpenVINO compiled-model cache")
    pr.set_defaults(_handler=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    from .deploy import ImageInputError, ModelFolderError

    try:
        return _export(args) if args.command == "export" else _predict(args)
    except (ModelFolderError, ImageInputError, ValueError, FileNotFoundError) as exc:
        print(f"musc-fast: error: {_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"musc-fast: error: {_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _export(args: argparse.Namespace) -> int:
    from .bank import Bank
    from .export import export_bank
    from .export.writer import check_out_folder, describe

    for q, flag in ((args.threshold_quantile, "--threshold-quantile"), (args.pixel_quantile, "--pixel-quantile")):
        if q is not None and not 0.0 <= q <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], got {q}")
    check_out_folder(Path(args.out))  # before loading anything
    bank = Bank.load(args.bank)
    bank = bank.with_config(device="cpu")
    out = export_bank(bank, args.out, fmt=args.model_format, precision="fp16" if args.fp16 else "fp32",
                      quantile=args.threshold_quantile, pixel_quantile=args.pixel_quantile, bank_file=args.bank,
                      external_data=True if args.external_data else None)
    print(f"wrote {describe(out)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .deploy import ImageInputError, Inferencer

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise ImageInputError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    inf = Inferencer(args.model, runtime=args.runtime, normalize=args.normalize, cache_dir=args.cache_dir)
    print("image,score,label")
    for path in args.images:
        p = inf.predict(path)
        print(f"{path},{p.score:.6f},{'NG' if p.label else 'OK'}", flush=True)
    return 0
