"""The model folder's JSON (``model.json``): what the exported graph expects and how to read its outputs.

Written by ``musc_fast.export``, read and checked by ``musc_fast.deploy.Inferencer`` (no torch here).

Keys: ``format`` (``"musc_fast.deploy"``), ``format_version`` (``FORMAT_VERSION``; a folder of another
version is refused), ``musc_fast_version``, ``model_format`` (``onnx`` / ``openvino``), ``precision``
(``fp32`` / ``fp16``), ``files`` (name -> SHA-256 of every file of the graph), ``inputs`` / ``outputs``,
``preprocessing`` (``Preprocessing.to_dict``), ``thresholds`` (image and pixel, from the bank's
leave-one-out calibration), ``normalization`` (min/max of the leave-one-out image scores and map
pixels), ``config`` and ``config_hash`` (the bank's), ``bank`` (images, file checksum) and
``meta_checksum``: SHA-256 of every other key (sorted JSON), so an edited threshold is noticed too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "musc_fast.deploy"
FORMAT_VERSION = 1
MANIFEST = "model.json"
MODEL_FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16")


class ModelFolderError(ValueError):
    """A model folder cannot be used (missing or edited file, other format version); one line."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def meta_checksum(meta: dict) -> str:
    """SHA-256 of the sorted JSON of every key except ``meta_checksum``."""
    blob = json.dumps({k: v for k, v in meta.items() if k != "meta_checksum"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict:
    """The checked JSON of a model folder.

    Args:
        verify: also hash every graph file against ``files`` (reads them once).
    Raises:
        ModelFolderError: no folder or JSON, unreadable JSON, another format or version, edited JSON,
            a missing file or one whose SHA-256 differs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (not a musc_fast model folder, or an incomplete copy)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path}: not readable JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: not a musc_fast model (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        made = meta.get("musc_fast_version", "?")
        raise ModelFolderError(f"{path}: model format version {version!r} (musc_fast {made}), this musc_fast "
                               f"reads version {FORMAT_VERSION}: export the bank again with this version")
    if meta_checksum(meta) != meta.get("meta_checksum"):
        raise ModelFolderError(f"{path}: checksum mismatch (the JSON was edited or is corrupt): export again")
    if meta.get("model_format") not in MODEL_FORMATS or meta.get("precision") not in PRECISIONS:
        raise ModelFolderError(f"{path}: unknown model_format/precision {meta.get('model_format')!r}/"
                               f"{meta.get('precision')!r}")
    for name, digest in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise ModelFolderError(f"{f}: missing from the model folder (listed in {MANIFEST})")
        if verify and file_sha256(f) != digest:
            raise ModelFolderError(f"{f}: checksum mismatch (the file was edited or is corrupt): copy or export "
                                   "the model folder again")
    return meta


def write_manifest(folder: str | Path, meta: dict) -> Path:
    """Add ``meta_checksum`` and write ``model.json`` atomically (a temporary file, then a rename)."""
    import os

    meta = dict(meta)
    meta["meta_checksum"] = meta_checksum(meta)
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
