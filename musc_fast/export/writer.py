"""``export_bank``: a bank -> a model folder (one graph + ``model.json``) for ONNX Runtime or OpenVINO.

Folder contents: ``model.onnx`` (+ ``model.onnx.data``, the constants as ONNX external data, when the
graph is over 2 GB or ``external_data=True``) or ``model.xml`` + ``model.bin`` (OpenVINO IR, converted
from the same ONNX graph), and ``model.json`` (``musc_fast.deploy.manifest``).

Precisions. ``fp32``: everything float32. ``fp16``: the weights and the bank's features are *stored* in
float16 (half the folder) and widened to float32 where they are used (ONNX: a Cast after each constant;
OpenVINO: ``save_model(compress_to_fp16=True)``), so it computes in float32 on any CPU; the error is the
fp16 rounding of the constants (tolerance in tests/test_deploy.py).

The folder is written beside ``out`` under a temporary name and renamed into place when complete, so
an interrupted export leaves no half folder, and an existing model folder is only replaced by a whole
new one. A folder that holds anything but a musc_fast model is refused (nothing is overwritten).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..deploy.manifest import FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FORMATS, PRECISIONS, file_sha256, write_manifest
from ..deploy.preprocess import Preprocessing
from ..ops import lnamd_multi
from ..ops.interval import interval_bounds
from .graph import BankGraph

ONNX_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB, less a margin for the graph itself
OPSET = 17


class ExportError(ValueError):
    """A bank cannot be exported (too small, unsupported option, output folder in the way); one line."""


def check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"{out}: folder is not empty and holds no musc_fast model; choose another --out")


def build_graph(bank, *, storage: torch.dtype = torch.float32) -> BankGraph:
    """The torch module of ``bank`` (CPU, float32 compute) that the export traces."""
    from ..pipeline import MuSc

    c = bank.config
    m = len(bank)
    if m < 2:
        raise ExportError(f"the bank has {m} image(s); an exported model needs at least 2 (calibration)")
    if c.compat:
        raise ExportError("compat banks are not exported (their small-bank NaN rule is the original's quirk)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SmallBatchWarning: the widened interval is what Bank.score uses
        k_min, k_max = interval_bounds(m, c.topmin, compat=False)
    cfg = dataclasses.replace(c, device="cpu", precision="fp32", runtime="torch", compile="off")
    backbone = MuSc(cfg).backbone.float().eval()
    with torch.no_grad():
        bank_z = [lnamd_multi(t.detach().cpu(), list(c.r_list)) for t in bank.tokens]
    return BankGraph(backbone, bank_z, c.r_list, k_min, k_max, c.image_size, window=c.aligned_window,
                     storage=storage).eval()


def _onnx_export(graph: BankGraph, path: Path) -> None:
    s = graph.image_size
    example = torch.zeros(1, 3, s, s)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=["image"],
                          output_names=["score", "anomaly_map"],
                          dynamic_axes={"image": {0: "B"}, "score": {0: "B"}, "anomaly_map": {0: "B"}},
                          opset_version=OPSET, dynamo=False)


def fp16_storage(model) -> None:
    """In place: every float32 initializer of >= 16 values is stored as float16 and widened back by a
    Cast at the start of the graph (same names downstream), so the graph still computes in float32."""
    from onnx import TensorProto, helper, numpy_helper

    casts, keep = [], []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < 16:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init).astype(np.float16)
        half = numpy_helper.from_array(arr, name=f"{init.name}__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__widen"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _write_onnx(src: Path, dst_dir: Path, *, fp16: bool, external_data: bool | None) -> list[str]:
    import onnx

    model = onnx.load(str(src))  # loads external data that torch may have written beside src
    if fp16:
        fp16_storage(model)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > ONNX_LIMIT if external_data is None else external_data
    path = dst_dir / "model.onnx"
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return ["model.onnx", "model.onnx.data"]
    onnx.save_model(model, str(path))
    return ["model.onnx"]


def _write_openvino(src: Path, dst_dir: Path, *, fp16: bool) -> list[str]:
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("--format openvino needs OpenVINO: pip install 'musc-fast[openvino]'") from None
    ov_model = ov.convert_model(str(src))
    ov.save_model(ov_model, str(dst_dir / "model.xml"), compress_to_fp16=fp16)
    return ["model.xml", "model.bin"]


def export_bank(bank, out: str | Path, *, fmt: str = "onnx", precision: str = "fp32", quantile: float = 0.99,
                pixel_quantile: float | None = None, bank_file: str | Path | None = None,
                external_data: bool | None = None, check: bool = True) -> Path:
    """Export ``bank`` as a model folder at ``out``.

    Args:
        bank: a ``musc_fast.bank.Bank`` with at least 2 images.
        fmt: ``"onnx"`` or ``"openvino"``.
        precision: ``"fp32"`` or ``"fp16"`` (fp16 storage, see the module docstring).
        quantile: image threshold = this quantile of the bank's leave-one-out image scores.
        pixel_quantile: pixel threshold = this quantile of the leave-one-out map pixels; default the
            image threshold (as ``musc_fast.threshold.Threshold.from_bank``).
        bank_file: the bank's file, whose SHA-256 is recorded in the JSON.
        external_data: ONNX constants in ``model.onnx.data``; default only when over 2 GB.
        check: run the exported graph once on a random image and compare with the torch module.
    Returns:
        the folder.
    """
    from ..threshold import Threshold

    if fmt not in MODEL_FORMATS:
        raise ExportError(f"format must be one of {', '.join(MODEL_FORMATS)}, got {fmt!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out)
    check_out_folder(out)
    fp16 = precision == "fp16"
    graph = build_graph(bank)
    thr = Threshold.from_bank(bank, quantile, pixel_quantile=pixel_quantile)
    loo = bank.leave_one_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        raw = work / "raw"
        raw.mkdir()
        _onnx_export(graph, raw / "graph.onnx")
        new = work / "model"
        new.mkdir()
        if fmt == "onnx":
            files = _write_onnx(raw / "graph.onnx", new, fp16=fp16, external_data=external_data)
        else:
            files = _write_openvino(raw / "graph.onnx", new, fp16=fp16)
        pp = graph.backbone.preprocess
        c = bank.config
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "musc_fast_version": __version__,
            "model_format": fmt,
            "precision": precision,
            "files": {name: file_sha256(new / name) for name in files},
            "inputs": {"image": {"shape": ["B", 3, c.image_size, c.image_size], "dtype": "float32"}},
            "outputs": {"score": {"shape": ["B"], "dtype": "float32"},
                        "anomaly_map": {"shape": ["B", c.image_size, c.image_size], "dtype": "float32"}},
            "preprocessing": Preprocessing(c.image_size, pp.interpolation, tuple(pp.mean), tuple(pp.std)).to_dict(),
            "thresholds": {"image": thr.image, "pixel": thr.pixel, "source": thr.source, "quantile": quantile,
                           "pixel_quantile": pixel_quantile},
            "normalization": {"method": "min_max", "image_min": float(np.min(loo.raw_image_scores)),
                              "image_max": float(np.max(loo.raw_image_scores)),
                              "pixel_min": float(np.min(loo.anomaly_maps)),
                              "pixel_max": float(np.max(loo.anomaly_maps))},
            "config": c.to_dict(),
            "config_hash": _feature_hash(c),
            "bank": {"images": len(bank), "interval": [graph.k_min, graph.k_max],
                     "file": None if bank_file is None else Path(bank_file).name,
                     "sha256": None if bank_file is None else file_sha256(bank_file)},
        }
        write_manifest(new, meta)
        if check:
            _self_check(graph, new, fp16)
        _swap_into_place(new, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _feature_hash(config) -> str:
    from ..bank import feature_hash

    return feature_hash(config)


def _self_check(graph: BankGraph, folder: Path, fp16: bool) -> None:
    """The exported graph on one random image against the torch module (fp32: 1e-4, fp16: 5e-2)."""
    from ..deploy import Inferencer

    x = torch.randn(1, 3, graph.image_size, graph.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        score, maps = graph(x)
    got_score, got_maps = Inferencer(folder).run(x.numpy())
    err = max(float(np.abs(got_score - score.numpy()).max()), float(np.abs(got_maps - maps.numpy()).max()))
    tol = 5e-2 if fp16 else 1e-4
    if not err <= tol:  # NaN too
        raise ExportError(f"the exported graph differs from the torch module by {err:.3g} (> {tol:g}): not written")


def _swap_into_place(new: Path, out: Path, work: Path) -> None:
    """Rename the finished folder to ``out``; an old model folder there is moved aside first and removed
    only once the new one is in place."""
    old = None
    if out.exists():
        old = work / "previous"
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous model back
        raise


def describe(folder: str | Path) -> str:
    """One line about an exported folder (for the CLI)."""
    meta = json.loads((Path(folder) / MANIFEST).read_text())
    size = sum((Path(folder) / f).stat().st_size for f in meta["files"])
    return (f"{folder}: {meta['model_format']} {meta['precision']}, bank of {meta['bank']['images']} images, "
            f"{size / 2**20:.1f} MiB, image threshold {meta['thresholds']['image']:.6g}")
