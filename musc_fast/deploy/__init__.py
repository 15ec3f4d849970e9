"""Run an exported bank (``musc-fast export``) without torch: numpy, pillow and ONNX Runtime or OpenVINO.

>>> from musc_fast.deploy import Inferencer
>>> p = Inferencer("model_dir").predict("new.png")     # p.score, p.label, p.anomaly_map, p.mask

This package imports no torch (an import contract in pyproject.toml checks it); see docs/deploy.md.
"""
from .inferencer import RUNTIMES, Inferencer, Prediction
from .manifest import ModelFolderError, read_manifest
from .preprocess import ImageInputError, Preprocessing

__all__ = ["RUNTIMES", "ImageInputError", "Inferencer", "ModelFolderError", "Prediction", "Preprocessing",
           "read_manifest"]
