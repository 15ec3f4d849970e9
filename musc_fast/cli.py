"""``musc-fast``: run | demo | env | bench | tune (and bank / score when available).

Settings come from, in increasing priority: the preset of the chosen backbone (or "paper"), a YAML
``--config`` whose keys are the long flag names with underscores, and the command line.
Errors in the input are one line on stderr with exit code 2; ``--debug`` shows tracebacks. Every
setting is checked before any work (docs/reliability.md, "Settings: validated before any work"): each
YAML value against the type of its field (``MuScConfig``, ``RunOptions``), the device against this
machine, ``--out`` for being a writable folder; when the backbone is built (after the categories are
listed) and its weights would be downloaded, whether the hub can be reached (a 2 s probe) or the
weights are cached (``backbones.weights.check_download_possible``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import (
    PRESETS,
    MuScConfig,
    add_config_arguments,
    check_device_available,
    check_output_dir,
    check_type,
    config_fields,
    given_config_settings,
    none_tag,
    preset_for_backbone,
    read_settings_yaml,
    rscin_k_for,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Keys a YAML --config may hold for `run`: the run's own, and the MuScConfig fields (their flags and keys
# are made from the table next to the dataclass, ``config.add_config_arguments``).
RUN_KEYS = ("dataset", "data_path", "category", "out", "vis", "save_xlsx", "num_workers", "preset", "strict",
            "resume")
CONFIG_KEYS = tuple(name for name, _ in config_fields("run"))


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    add_config_arguments(g, "run")  # one flag per MuScConfig field; absent unless given


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
        from .cli_tune import add_tune_command
    except ImportError:  # no torch (a deploy-only install runs `musc-fast predict`): no tune command
        pass
    else:
        add_tune_command(sub)

    try:
        from .cli_bank import add_bank_commands
    except ImportError:  # the bank commands ship with the production module
        pass
    else:
        add_bank_commands(sub)
    from .cli_export import add_export_commands  # export, predict (docs/deploy.md)

    add_export_commands(sub)
    return parser


def merged_settings(args: argparse.Namespace) -> dict[str, Any]:
    """YAML settings overridden by the flags that were given (a MuScConfig flag that was given is an
    attribute of ``args``, even when its value is None: ``--pretrained none``)."""
    settings = read_settings_yaml(args.config, RUN_KEYS + CONFIG_KEYS, "run") if getattr(args, "config", None) else {}
    if isinstance(settings.get("pretrained"), str):
        settings["pretrained"] = none_tag(settings["pretrained"])
    for key in RUN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    settings.update(given_config_settings(args, "run"))
    return settings


def check_run_settings(settings: dict[str, Any]) -> None:
    """Check the type of every run-level setting (a YAML ``save_xlsx: 'false'`` is a string, not a bool),
    against ``RunOptions``' field types where the names match."""
    import typing

    from .runner import RunOptions

    hints = typing.get_type_hints(RunOptions)
    hints.update(category=str | list[str], preset=str)
    for key in RUN_KEYS:
        if key in settings and key in hints:
            check_type(key, settings[key], hints[key])


def config_from_settings(settings: dict[str, Any]) -> MuScConfig:
    """The MuScConfig: base preset (explicit, or the backbone's own, or "paper") + overrides.
    Raises ValueError/CliError (one line) for a value of the wrong type or out of range, or a device
    this machine does not have."""
    preset = settings.get("preset")
    if preset is not None and preset not in PRESETS:
        raise CliError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if preset is None:
        preset = preset_for_backbone(settings.get("backbone"))
    overrides = {k: settings[k] for k in CONFIG_KEYS if k in settings}
    if overrides.get("mask_threshold") == "original":  # the YAML spelling of the original's rule
        overrides["mask_threshold"] = None
    if "rscin_k" not in overrides and settings.get("dataset"):
        overrides["rscin_k"] = rscin_k_for(settings["dataset"])
    config = MuScConfig.preset(preset, **overrides)  # ValueError: one line, exit 2
    check_device_available(config.device)
    return config



def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunOptions, run

    settings = merged_settings(args)
    for key in ("dataset", "data_path"):
        if not settings.get(key):
            raise CliError(f"--{key.replace('_', '-')} is required (on the command line or in --config)")
    check_run_settings(settings)
    config = config_from_settings(settings)
    categories = settings.get("category") or ["all"]
    if isinstance(categories, str):
        categories = [categories]
    data_path = Path(settings["data_path"])
    opts = RunOptions(
        dataset=settings["dataset"], data_path=str(data_path), categories=[str(c) for c in categories],
        out=settings.get("out") or "output", vis=settings.get("vis"), save_xlsx=bool(settings.get("save_xlsx")),
        num_workers=settings.get("num_workers"), progress=not args.no_progress, debug=args.debug,
        strict=bool(settings.get("strict")), resume=bool(settings.get("resume")))
    check_output_dir(opts.out, "--out")
    if settings["dataset"] == "synthetic" and not data_path.exists():
        print(f"generating the synthetic data set in {data_path}")
        _generate_synthetic_atomic(data_path)
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
    config = MuScConfig.preset("offline", device=args.device, runtime="auto")
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


def cmd_tune(args: argparse.Namespace) -> int:
    from .cli_tune import run_tune

    return run_tune(args)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "env": cmd_env, "bench": cmd_bench, "tune": cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import original_cli  # the original MuSc script's flags / YAML sections: translated to `run`

    if original_cli.looks_original(argv):
        return original_cli.main(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "bench":  # everything after `bench` is bench_e2e.py's
        args = parser.parse_args(argv[:command + 1])
        args.bench_args = argv[command + 1:]
    else:
        args = parser.parse_args(argv)
    handler = COMMANDS.get(args.command) or getattr(args, "_handler", None)
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
