"""musc_fast: fast zero-shot anomaly classification and segmentation with MuSc (ICLR 2024).

Public API: ``MuSc``, ``MuScConfig``, ``Result``, ``score_features``, ``PRESETS``; the algorithm steps
live in ``musc_fast.ops`` (``lnamd``, ``mutual_scores``, ``rscin``).

The names are imported on first use (module ``__getattr__``), so that ``import musc_fast.deploy`` (the
torch-free inferencer) does not pull in torch through this file.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"MuSc": "pipeline", "Result": "pipeline", "score_features": "pipeline", "MuScConfig": "config",
         "PRESETS": "config"}

__all__ = ["MuSc", "MuScConfig", "Result", "score_features", "PRESETS", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):  # ``musc_fast.ops`` after a bare ``import musc_fast``, as before
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
