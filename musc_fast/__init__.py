"""musc_fast: fast zero-shot anomaly classification and segmentation with MuSc (ICLR 2024).

Public API: ``MuSc``, ``MuScConfig``, ``Result``, ``score_features``, ``PRESETS``; the algorithm steps
live in ``musc_fast.ops`` (``lnamd``, ``mutual_scores``, ``rscin``).
"""
from .config import PRESETS, MuScConfig
from .pipeline import MuSc, Result, score_features

__version__ = "0.1.0"

__all__ = ["MuSc", "MuScConfig", "Result", "score_features", "PRESETS", "__version__"]
