"""Export a reference bank as one deployable graph (ONNX or OpenVINO IR) with a JSON beside it.

``export_bank(bank, out)`` writes the folder that ``musc_fast.deploy.Inferencer`` runs without torch;
``BankGraph`` is the torch module it traces (docs/deploy.md).
"""
from .graph import BankGraph
from .writer import ExportError, build_graph, export_bank

__all__ = ["BankGraph", "ExportError", "build_graph", "export_bank"]
