"""The original MuSc script's interface (``python examples/musc_main.py --config configs/musc.yaml ...``,
SPEC 8.1), translated to a ``musc-fast run``.

Users switch by changing one word: ``python examples/musc_main.py --device 0 --data_path ... --class_name
ALL ...`` becomes ``musc-fast --device 0 --data_path ...``; ``musc-fast run --config configs/musc.yaml``
reads the original's YAML too. The format is detected (``looks_original``): an underscore flag of the
original's set, or a ``--config`` YAML with its sections ``datasets`` / ``models`` / ``testing`` /
``device``.

Precedence as in the original: its built-in defaults < the YAML file < the flags. ``--vis`` and
``--save_excel`` take the strings true/false. ``--device N`` means ``cuda:N``, or the CPU without CUDA.
Outputs keep the original's layout, ``<output_dir>/<dataset_name>/<backbone_name>/imagesize<S>/``, with
``results.xlsx`` (sheet "MuSc_results", pixel metrics first, ``outputs.write_xlsx``) when
``save_excel`` is true, next to our own results files.

Backbones the original does not have (``efficientnet_lite0``): its ViT-only values ``pretrained``
(e.g. ``openai``) and ``feature_layers`` that the backbone cannot take are replaced by the backbone
preset's, with a note on stderr, as the original itself ignores ``--pretrained`` on its DINO runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

# The original's defaults (configs/musc.yaml and musc_main.py, SPEC 8.1).
DEFAULTS: dict[str, Any] = {
    "dataset_name": "mvtec_ad", "data_path": "./data/mvtec_anomaly_detection/", "class_name": "ALL",
    "img_resize": 518, "divide_num": 1, "backbone_name": "ViT-L-14-336", "pretrained": "openai",
    "batch_size": 4, "feature_layers": [5, 11, 17, 23], "r_list": [1, 3, 5], "device": 0,
    "output_dir": "output", "vis": False, "vis_type": "single_norm", "save_excel": False,
}
SECTIONS: dict[str, tuple[str, ...]] = {
    "datasets": ("dataset_name", "data_path", "class_name", "img_resize", "divide_num"),
    "models": ("backbone_name", "pretrained", "batch_size", "feature_layers", "r_list"),
    "testing": ("output_dir", "vis", "vis_type", "save_excel"),
}
FLAGS = tuple(f"--{k}" for k in DEFAULTS if "_" in k)  # the flags only the original spells with "_"
# The original's backbones (SPEC 1.3): their settings are passed on as they are.
ORIGINAL_BACKBONES = ("ViT-B-32", "ViT-B-16", "ViT-B-16-plus-240", "ViT-L-14", "ViT-L-14-336", "dino_vitbase16",
                      "dino_vitbase8", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vits14")


class OriginalConfigError(ValueError):
    """A bad value in the original-format config or flags (one line, exit code 2)."""


def _read_yaml(path: str) -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise OriginalConfigError(f"{p}: config file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise OriginalConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from exc


def is_original_yaml(path: str) -> bool:
    """True for a YAML mapping whose top level has only the original's sections (and one of them)."""
    try:
        data = _read_yaml(path)
    except OriginalConfigError:
        return False
    keys = set(data) if isinstance(data, dict) else set()
    return bool(keys & {"datasets", "models", "testing"}) and keys <= {*SECTIONS, "device"}


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def looks_original(argv: Sequence[str]) -> bool:
    """Whether a ``musc-fast`` command line is in the original's format: no subcommand (or ``run``)
    with one of its underscore flags or a ``--config`` file with its sections."""
    argv = list(argv)
    if argv and argv[0] == "run":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        return False  # another subcommand
    if any(a.split("=", 1)[0] in FLAGS for a in argv):
        return True
    config = _config_arg(argv)
    return config is not None and is_original_yaml(config)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise OriginalConfigError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musc-fast", description="The original MuSc script's flags (musc_main.py).")
    p.add_argument("--config", help="the original's YAML (sections datasets, models, testing, device)")
    p.add_argument("--data_path")
    p.add_argument("--dataset_name")
    p.add_argument("--class_name")
    p.add_argument("--device")
    p.add_argument("--output_dir")
    p.add_argument("--vis")
    p.add_argument("--vis_type", choices=["single_norm", "whole_norm"])
    p.add_argument("--save_excel")
    p.add_argument("--r_list", type=int, nargs="+")
    p.add_argument("--feature_layers", type=int, nargs="+")
    p.add_argument("--backbone_name")
    p.add_argument("--pretrained")
    p.add_argument("--img_resize", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--divide_num", type=int)
    p.add_argument("--no-progress", action="store_true", help="(musc-fast) no progress bars")
    p.add_argument("--debug", action="store_true", help="(musc-fast) show tracebacks")
    return p


def original_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The original's keys: defaults < YAML sections < flags."""
    settings = dict(DEFAULTS)
    if args.config:
        data = _read_yaml(args.config)
        if not isinstance(data, dict):
            raise OriginalConfigError(f"{args.config}: expected the sections datasets, models, testing, device")
        for section, keys in SECTIONS.items():
            block = data.get(section) or {}
            if not isinstance(block, dict):
                raise OriginalConfigError(f"{args.config}: section {section!r} must be a mapping")
            unknown = sorted(set(block) - set(keys))
            if unknown:
                raise OriginalConfigError(f"{args.config}: unknown keys in {section}: {', '.join(unknown)}; "
                                          f"valid: {', '.join(keys)}")
            settings.update(block)
        unknown = sorted(set(data) - {*SECTIONS, "device"})
        if unknown:
            raise OriginalConfigError(f"{args.config}: unknown sections {', '.join(unknown)}")
        if "device" in data:
            settings["device"] = data["device"]
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def _device(value: Any) -> str:
    import torch

    text = str(value).strip().lower()
    if text in ("cpu", "auto") or text.startswith("cuda"):
        return text
    try:
        index = int(text)
    except ValueError as exc:
        raise OriginalConfigError(f"--device: expected a GPU number, got {value!r}") from exc
    return f"cuda:{index}" if torch.cuda.is_available() else "cpu"


def translate(settings: dict[str, Any], notes: list[str] | None = None) -> dict[str, Any]:
    """The original's keys -> ``musc-fast run``'s settings (``cli.config_from_settings`` / RunOptions)."""
    from .config import PRESETS

    notes = [] if notes is None else notes
    backbone = str(settings["backbone_name"])
    out: dict[str, Any] = {
        "dataset": str(settings["dataset_name"]), "data_path": str(settings["data_path"]),
        "category": ["all" if str(settings["class_name"]).lower() == "all" else str(settings["class_name"])],
        "out": str(settings["output_dir"]), "save_xlsx": _bool(settings["save_excel"]),
        "vis": str(settings["vis_type"]) if _bool(settings["vis"]) else None,
        "backbone": backbone, "pretrained": settings["pretrained"], "image_size": int(settings["img_resize"]),
        "layers": [int(x) for x in settings["feature_layers"]], "r_list": [int(x) for x in settings["r_list"]],
        "batch_size": int(settings["batch_size"]), "divide_num": int(settings["divide_num"]),
        "device": _device(settings["device"]),
    }
    if isinstance(out["pretrained"], str) and out["pretrained"].lower() in ("none", "null", "random"):
        out["pretrained"] = None
    preset = PRESETS.get(backbone)
    if backbone not in ORIGINAL_BACKBONES and preset is None:
        preset = next((c for c in PRESETS.values() if c.backbone == backbone), None)
    if backbone not in ORIGINAL_BACKBONES and preset is not None:
        if out["pretrained"] != preset.pretrained:
            notes.append(f"{backbone} has no pretrained tag {out['pretrained']!r}: using {preset.pretrained!r}")
            out["pretrained"] = preset.pretrained
        depth = _depth(backbone)
        if depth is not None and any(x >= depth for x in out["layers"]):
            notes.append(f"{backbone} has {depth} blocks, feature_layers {out['layers']} do not fit: using "
                         f"{list(preset.layers)}")
            out["layers"] = list(preset.layers)
    return out


def _depth(backbone: str) -> int | None:
    """Number of tappable blocks of our own (non-original) backbones."""
    if backbone == "efficientnet_lite0":
        import timm

        from .backbones.cnn import TIMM_ARCH

        return len(timm.create_model(TIMM_ARCH, pretrained=False).blocks)  # random init: only its shape is read
    return None


def main(argv: Sequence[str]) -> int:
    """Run the original-format command line; returns the exit code (2 for bad input)."""
    from . import cli

    argv = list(argv)
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        notes: list[str] = []
        settings = translate(original_settings(args), notes)
        for note in notes:
            print(f"musc-fast: note: {note}", file=sys.stderr)
        run_args = argparse.Namespace(config=None, no_progress=args.no_progress, debug=args.debug,
                                      **{k: None for k in cli.RUN_KEYS})
        for key, value in settings.items():
            setattr(run_args, key, value)
        return cli.cmd_run(run_args)
    except Exception as exc:
        if args.debug:
            raise
        from .data import DatasetError
        from .outputs import OutputError

        usage = (OriginalConfigError, cli.CliError, DatasetError, ValueError, FileNotFoundError)
        print(f"musc-fast: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return cli.EXIT_USAGE if isinstance(exc, usage) and not isinstance(exc, OutputError) else cli.EXIT_FAILED
