"""``Inferencer``: run an exported model folder on ONNX Runtime or OpenVINO, with numpy and PIL only.

Runtimes. ``"auto"``: OpenVINO for an OpenVINO folder; for an ONNX folder ONNX Runtime when installed,
else OpenVINO (which reads ONNX too). OpenVINO compiles with ``INFERENCE_PRECISION_HINT=f32`` (no
silent bf16 on CPUs that have it).

Runtime cache (OpenVINO, optional ``cache_dir``): the compiled model is exported once to
``<cache_dir>/<key>.blob`` (key: SHA-256 of the model files, the OpenVINO version and the settings) and
imported on the next start. A blob that cannot be imported is rebuilt with a ``RuntimeWarning``; it is
written to a temporary file and renamed, so a crash never leaves a half blob.

Outputs. ``score`` is the max of the anomaly map (RsCIN off: a lone image has no set), the same number
``Bank.score`` gives. ``label`` is ``score > image threshold`` (True = NG), ``mask`` is
``anomaly_map > pixel threshold``; the thresholds come from the bank's leave-one-out calibration
(``model.json``) unless given. ``normalize=True`` maps ``score`` and ``anomaly_map`` to [0, 1] with
the image (pixel) threshold at 0.5: ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``, min and max
of the bank's leave-one-out image scores (map pixels) (anomalib's convention); labels and masks are
always decided on the raw values, so normalising never changes them.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from . import preprocess as pre
from .manifest import ModelFolderError, read_manifest
from .openvino_core import shared_core

RUNTIMES = ("auto", "onnxruntime", "openvino")


@dataclass
class Prediction:
    """What ``Inferencer.predict`` returns; arrays have a leading batch axis B when a batch was given.

    Attributes:
        score: image score(s), float ([B] float32); normalised to [0, 1] when the inferencer normalises.
        label: True = NG (``raw_score > image threshold``), bool ([B] bool).
        anomaly_map: [S, S] float32 ([B, S, S]); normalised like ``score``.
        mask: [S, S] bool ([B, S, S]): ``raw map > pixel threshold``.
        raw_score: the score before normalisation.
    """

    score: float | np.ndarray
    label: bool | np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray
    raw_score: float | np.ndarray


def _is_batch(images) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, np.ndarray) and images.ndim == 4


class Inferencer:
    """An exported model folder, ready to score images.

    >>> inf = Inferencer("model_dir")          # checks model.json and every file's SHA-256
    >>> p = inf.predict("new.png")            # p.score, p.label, p.anomaly_map, p.mask

    Args:
        model_dir: a folder written by ``musc-fast export``.
        runtime: ``"auto"``, ``"onnxruntime"`` or ``"openvino"``.
        normalize: report ``score``/``anomaly_map`` normalised (threshold at 0.5), see the module doc.
        image_threshold, pixel_threshold: override the calibrated thresholds (raw score scale);
            the pixel threshold defaults to the calibrated one.
        threads: CPU threads for the runtime (default: its own choice).
        cache_dir: OpenVINO's compiled-model cache folder (None: compile at every start).
        verify: hash the model files at start (a few ms per MB).
    Raises:
        ModelFolderError: a missing or edited file, JSON of another version, runtime not installed.
    """

    def __init__(self, model_dir: str | Path, *, runtime: str = "auto", normalize: bool = False,
                 image_threshold: float | None = None, pixel_threshold: float | None = None,
                 threads: int | None = None, cache_dir: str | Path | None = None, verify: bool = True):
        self.folder = Path(model_dir)
        self.meta = read_manifest(self.folder, verify=verify)
        self.preprocessing = pre.Preprocessing.from_dict(self.meta["preprocessing"])
        self.image_size = self.preprocessing.image_size
        thr = self.meta["thresholds"]
        self.image_threshold = float(thr["image"] if image_threshold is None else image_threshold)
        self.pixel_threshold = float(thr["pixel"] if pixel_threshold is None else pixel_threshold)
        self.normalize = bool(normalize)
        self.runtime = self._resolve(runtime)
        self.threads, self.cache_dir = threads, None if cache_dir is None else Path(cache_dir)
        self._run = self._load()

    # --- runtimes --------------------------------------------------------------------------------
    def _model_file(self) -> Path:
        return self.folder / ("model.onnx" if self.meta["model_format"] == "onnx" else "model.xml")

    def _resolve(self, runtime: str) -> str:
        import importlib.util

        if runtime not in RUNTIMES:
            raise ModelFolderError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        have = [r for r in ("onnxruntime", "openvino") if importlib.util.find_spec(r) is not None]
        fmt = self.meta["model_format"]
        if runtime == "auto":
            order = ("openvino",) if fmt == "openvino" else ("onnxruntime", "openvino")
            for r in order:
                if r in have:
                    return r
            runtime = order[0]
        if runtime == "onnxruntime" and fmt == "openvino":
            raise ModelFolderError(f"{self.folder}: an OpenVINO model runs on OpenVINO only; use runtime "
                                   "'openvino' or export with --format onnx")
        if runtime not in have:
            extra = "onnx" if runtime == "onnxruntime" else "openvino"
            raise ModelFolderError(f"runtime {runtime!r} is not installed: pip install 'musc-fast[{extra}]'")
        return runtime

    def _load(self):
        path = self._model_file()
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = int(self.threads)
            try:
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # the runtime's own error types
                raise ModelFolderError(f"{path}: ONNX Runtime cannot load it ({_one_line(exc)})") from None
            return lambda x: sess.run(["score", "anomaly_map"], {"image": x})
        return self._load_openvino(path)

    def _ov_config(self) -> dict:
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        return cfg

    def cache_path(self) -> Path | None:
        """Where the compiled OpenVINO model is cached (None without ``cache_dir`` or on ONNX Runtime)."""
        if self.cache_dir is None or self.runtime != "openvino":
            return None
        import openvino as ov

        blob = "|".join([*(f"{k}={v}" for k, v in sorted(self.meta["files"].items())), ov.get_version(),
                         *(f"{k}={v}" for k, v in sorted(self._ov_config().items()))])
        return self.cache_dir / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.blob"

    def _load_openvino(self, path: Path):
        core = shared_core()  # one Core per process: see openvino_core.py for the crash a second one caused
        cfg = self._ov_config()
        blob = self.cache_path()
        compiled = None
        if blob is not None and blob.is_file():
            try:
                with open(blob, "rb") as fh:
                    compiled = core.import_model(fh.read(), "CPU", cfg)
            except Exception as exc:  # a truncated or foreign blob: rebuild once
                warnings.warn(f"runtime cache {blob} is unreadable ({_one_line(exc)[:80]}); rebuilding it",
                              RuntimeWarning, stacklevel=3)
                compiled = None
        if compiled is None:
            try:
                compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
            except Exception as exc:
                raise ModelFolderError(f"{path}: OpenVINO cannot load it ({_one_line(exc)[:160]})") from None
            if blob is not None:
                _write_atomic(blob, _exported(compiled))
        request = compiled.create_infer_request()
        outs = {o.get_any_name(): o for o in compiled.outputs}

        def run(x: np.ndarray):
            res = request.infer({"image": x})
            return [np.array(res[outs["score"]], copy=True), np.array(res[outs["anomaly_map"]], copy=True)]
        return run

    # --- inference -------------------------------------------------------------------------------
    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw graph: preprocessed [B, 3, S, S] float32 -> (score [B], anomaly_map [B, S, S]) float32."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise pre.ImageInputError(f"preprocessed images must be [B, 3, {s}, {s}] float32, got {list(x.shape)}")
        score, maps = self._run(x)
        return np.asarray(score, dtype=np.float32), np.asarray(maps, dtype=np.float32)

    def preprocess(self, image) -> np.ndarray:
        """One image (path, PIL image, or uint8 array [H, W] / [H, W, 3|4]) -> [3, S, S] float32, as the
        loader makes it."""
        if isinstance(image, (str, os.PathLike)):
            return pre.load(image, self.preprocessing)
        if isinstance(image, np.ndarray):
            channels = image.shape[2] if image.ndim == 3 else 1
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
                raise pre.ImageInputError(f"an image array must be uint8 [H, W] or [H, W, 1|3|4], got "
                                          f"{image.dtype} {list(image.shape)}")
            image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        if isinstance(image, Image.Image):
            return pre.preprocess(image, self.preprocessing)
        raise pre.ImageInputError(f"expected an image path, a PIL image or a uint8 array, got {type(image).__name__}")

    def predict(self, images, *, batch_size: int = 8) -> Prediction:
        """Score one image or a batch (a list of images, or a uint8 array [B, H, W, C]).

        Returns:
            ``Prediction`` (scalars and [S, S] maps for one image, arrays with a leading B for a batch).
        Raises:
            ImageInputError: an image that cannot be read, one line naming it.
        """
        batch = _is_batch(images)
        items: Sequence = list(images) if batch else [images]
        if not items:
            raise pre.ImageInputError("no images given")
        scores, maps = [], []
        for s0 in range(0, len(items), batch_size):
            x = np.stack([self.preprocess(im) for im in items[s0:s0 + batch_size]])
            sc, mp = self.run(x)
            scores.append(sc)
            maps.append(mp)
        return self._prediction(np.concatenate(scores), np.concatenate(maps), batch)

    def _prediction(self, raw: np.ndarray, maps: np.ndarray, batch: bool) -> Prediction:
        label = raw > self.image_threshold
        mask = maps > self.pixel_threshold
        score, amap = raw, maps
        if self.normalize:
            norm = self.meta["normalization"]
            score = _min_max(raw, self.image_threshold, norm["image_min"], norm["image_max"])
            amap = _min_max(maps, self.pixel_threshold, norm["pixel_min"], norm["pixel_max"])
        if batch:
            return Prediction(score, label, amap, mask, raw)
        return Prediction(float(score[0]), bool(label[0]), amap[0], mask[0], float(raw[0]))


def _min_max(x: np.ndarray, threshold: float, lo: float, hi: float) -> np.ndarray:
    """anomalib's normalisation: the threshold goes to 0.5, the calibration range to a width of 1."""
    span = max(float(hi) - float(lo), 1e-12)
    return np.clip((x.astype(np.float64) - threshold) / span + 0.5, 0.0, 1.0).astype(np.float32)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _exported(compiled) -> bytes:
    import io

    buf = io.BytesIO()
    compiled.export_model(buf)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
