"""``musc-fast``: run | demo | env | bench (and bank / score when available).

Settings come from, in increasing priority: the preset of the chosen backbone (or "paper"), a YAML
``--config`` whose keys are the long flag names with underscores, and the command line.
Errors in the input are one line on stderr with exit code 2; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import COMPILE_MODES, PRESETS, MuScConfig, rscin_k_for

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Keys a YAML --config may hold for `run`, and which of them are MuScConfig fields.
RUN_KEYS = ("dataset", "data_path", "category", "out", "vis", "save_xlsx", "num_workers", "preset", "strict",
            "resume")
CONFIG_KEYS = ("backbone", "pretrained", "weights", "image_size", "layers", "r_list", "topmin", "rscin_k",
               "batch_size", "divide_num", "device", "precision", "msm_precision", "compat", "quick_gelu",
               "compile")


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _tag(value: str) -> str | None:
    return None if value.lower() in ("none", "null", "random") else value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    g.add_argument("--backbone", help="backbone name (musc-fast env lists them)")
    g.add_argument("--pretrained", type=_tag, default=argparse.SUPPRESS,  # absent unless given: 'none' -> None
                   help="weights tag for the normal download path; 'none' = random")
    g.add_argument("--weights", help="a local weights file (.pt/.pth/.safetensors), for air-gapped machines")
    g.add_argument("--image-size", type=int, help="input side S (the maps are S x S)")
    g.add_argument("--layers", type=int, nargs="+", help="0-based blocks to tap")
    g.add_argument("--r-list", type=int, nargs="+", help="LNAMD aggregation degrees (odd)")
    g.add_argument("--topmin", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="interval of the sorted per-image distances to average (default 0 0.3)")
    g.add_argument("--rscin-k", type=int, nargs="+", help="RsCIN windows (default per data set; 0 = off)")
    g.add_argument("--batch-size", type=int, help="images per backbone forward")
    g.add_argument("--divide-num", type=int, help="score in this many stratified subsets (SPEC 7.4)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="backbone dtype")
    g.add_argument("--msm-precision", choices=["fp32", "bf16", "fp16"], help="mutual-scoring matmul dtype")
    g.add_argument("--compile", choices=list(COMPILE_MODES),
                   help="torch.compile the backbone (compile time reported apart; pays on large sets)")
    g.add_argument("--compat", action="store_true", default=None,
                   help="reproduce the original's edge cases (NaN for N<=4, 0 for missing metrics)")
    g.add_argument("--quick-gelu", type=lambda s: s.lower() in ("1", "true", "yes"), metavar="BOOL",
                   help="force the CLIP activation (default: the original's quirk)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musc-fast", description="Zero-shot anomaly classification and segmentation with MuSc, fast.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate a data set (metrics, scores, heat maps)")
    run.add_argument("--config", help="YAML file with the same keys as the flags")
    run.add_argument("--dataset", help="mvtec, visa, btad, mvtec3d, folder, synthetic")
    run.add_argument("--data-path", help="the data set's root folder")
    run.add_argument("--category", nargs="+", help="category names or 'all' (default all)")
    run.add_argument("--out", help="output root (default ./output)")
    run.add_argument("--vis", choices=["single_norm", "whole_norm", "overlay"], help="write heat maps")
    run.add_argument("--save-xlsx", action="store_true", default=None, help="also write results.xlsx")
    run.add_argument("--num-workers", type=int, help="image-decoding processes")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--strict", action="store_true", default=None,
                     help="an unreadable image file is an error (exit 2) instead of being skipped and listed")
    run.add_argument("--resume", action="store_true", default=None,
                     help="reuse categories that an earlier run with the same settings and inputs finished")
    _add_model_flags(run)

    demo = sub.add_parser("demo", help="generate a synthetic set and run it offline on the CPU")
    demo.add_argument("--out", default="musc_fast_demo", help="folder for the data and the results")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--no-progress", action="store_true")

    sub.add_parser("env", help="versions, devices, active kernels and backends")

    bench = sub.add_parser("bench", help="the end-to-end speed ladder (bench/bench_e2e.py)")
    bench.add_argument("bench_args", nargs="*", help="arguments for bench/bench_e2e.py (see its --help)")

    try:
        from .cli_bank import add_bank_commands
    except ImportError:  # the bank commands ship with the production module
        pass
    else:
        add_bank_commands(sub)
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CliError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise CliError(f"{p}: expected a mapping of settings at the top level")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(RUN_KEYS) - set(CONFIG_KEYS))
    if unknown:
        raise CliError(f"{p}: unknown keys {', '.join(unknown)}; valid: {', '.join(RUN_KEYS + CONFIG_KEYS)}")
    return data


def merged_settings(args: argparse.Namespace) -> dict[str, Any]:
    """YAML settings overridden by the flags that were given."""
    settings = _load_yaml(args.config) if getattr(args, "config", None) else {}
    if isinstance(settings.get("pretrained"), str):
        settings["pretrained"] = _tag(settings["pretrained"])
    for key in RUN_KEYS + CONFIG_KEYS:
        if key == "pretrained" and hasattr(args, key):  # None here means "none" was asked for
            settings[key] = args.pretrained
            continue
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def config_from_settings(settings: dict[str, Any]) -> MuScConfig:
    """The MuScConfig: base preset (explicit, or the backbone's own, or "paper") + overrides."""
    preset = settings.get("preset")
    backbone = settings.get("backbone")
    if preset is None:
        matching = [n for n, c in PRESETS.items() if n != "paper" and c.backbone == backbone]
        preset = matching[0] if matching else "paper"
    overrides = {k: settings[k] for k in CONFIG_KEYS if k in settings}
    if "rscin_k" not in overrides and settings.get("dataset"):
        overrides["rscin_k"] = rscin_k_for(settings["dataset"])
    try:
        return MuScConfig.preset(preset, **overrides)
    except TypeError as exc:
        raise CliError(str(exc)) from exc


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunOptions, run

    settings = merged_settings(args)
    for key in ("dataset", "data_path"):
        if not settings.get(key):
            raise CliError(f"--{key.replace('_', '-')} is required (on the command line or in --config)")
    config = config_from_settings(settings)
    categories = settings.get("category") or ["all"]
    if isinstance(categories, str):
        categories = [categories]
    data_path = Path(settings["data_path"])
    if settings["dataset"] == "synthetic" and not data_path.exists():
        print(f"generating the synthetic data set in {data_path}")
        _generate_synthetic_atomic(data_path)
    opts = RunOptions(
        dataset=settings["dataset"], data_path=str(data_path), categories=[str(c) for c in categories],
        out=settings.get("out") or "output", vis=settings.get("vis"), save_xlsx=bool(settings.get("save_xlsx")),
        num_workers=settings.get("num_workers"), progress=not args.no_progress, debug=args.debug,
        strict=bool(settings.get("strict")), resume=bool(settings.get("resume")))
    from . import distributed

    distributed.init_from_env()  # no-op unless launched by torchrun
    try:
        summary = run(config, opts)
        return _report(summary) if distributed.is_main_process() else (EXIT_FAILED if summary.failures else EXIT_OK)
    finally:
        distributed.destroy()


def _generate_synthetic_atomic(data_path: Path) -> None:
    """Generate the demo set in a temporary sibling folder, then rename it: an interrupted generation
    never leaves a partial set that a later run would use."""
    import shutil

    from .data import generate_synthetic

    tmp = data_path.with_name(f".{data_path.name}.partial-{os.getpid()}")
    try:
        generate_synthetic(tmp)
        os.replace(tmp, data_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report(summary) -> int:
    if summary.per_category:
        print()
        print(summary.metrics_table())
    print(f"\nresults: {summary.root}")
    if summary.resumed:
        print(f"reused from an earlier run (--resume): {', '.join(summary.resumed)}")
    for name, why in summary.flagged.items():
        print(f"FLAGGED {name}: {why}", file=sys.stderr)
    for name, why in summary.failures.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    return EXIT_FAILED if summary.failures else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .runner import RunOptions, run

    out = Path(args.out)
    data = out / "data"
    if not data.exists():
        print(f"generating the synthetic data set in {data}")
        _generate_synthetic_atomic(data)
    config = MuScConfig.preset("offline", device=args.device)
    opts = RunOptions(dataset="synthetic", data_path=str(data), out=str(out / "results"), vis="overlay",
                      progress=not args.no_progress)
    return _report(run(config, opts))


def cmd_env(args: argparse.Namespace) -> int:
    from .env_report import env_report

    print(env_report())
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e.py"
    if not script.is_file():
        raise CliError(f"{script}: the benchmark ladder ships with the source checkout (bench/), not the wheel")
    import runpy

    saved, sys.argv = sys.argv, [str(script), *args.bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    return EXIT_OK


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "env": cmd_env, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "bench":  # everything after `bench` is bench_e2e.py's
        args = parser.parse_args(argv[:command + 1])
        args.bench_args = argv[command + 1:]
    else:
        args = parser.parse_args(argv)
    handler = COMMANDS.get(args.command)
    if handler is None:
        from .cli_bank import run_bank_command

        handler = run_bank_command
    try:
        return handler(args)
    except KeyboardInterrupt:
        hint = "; finished categories are saved, add --resume to continue" if args.command == "run" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users, full traceback with --debug
        if args.debug or os.environ.get("MUSC_FAST_DEBUG") == "1":
            raise
        from .data import DatasetError
        from .outputs import OutputError

        usage_errors = (CliError, DatasetError, ValueError, FileNotFoundError)
        print(f"musc-fast: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, usage_errors) and not isinstance(exc, OutputError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
