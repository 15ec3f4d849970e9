"""Export a backbone to ONNX once, cache it, and run it in ONNX Runtime or OpenVINO.

Cache. ``$MUSC_FAST_CACHE`` or ``$XDG_CACHE_HOME/musc_fast`` (default ``~/.cache/musc_fast``), file
``runtimes/<key>.onnx`` where key = sha256 of (backbone, weights tag, weights file content hash or the
parameters' hash, image size, layers, dtype, torch version, format version). Written to a temporary
file in the same folder, then ``os.replace``d (atomic). A cached file that cannot be loaded is
rebuilt with a ``RuntimeWarning``.

Auto choice (CPU only; CUDA always gets torch). ``FASTER_ON_CPU`` is a static table from
``bench/bench_runtime.py`` on the project's 2-core CPU: the runtime to use per backbone when it is
installed. Backbones not in the table stay on torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..backbones.base import Backbone, BackboneOutput

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
FORMAT_VERSION = 1

# Measured in bench/bench_runtime.py (bench/results/bench_runtime_cpu.csv): first installed entry wins.
FASTER_ON_CPU: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("openvino", "onnxruntime"),  # 8.2-9.1x / 4.2-5.9x over eager (256 px, batch 16)
    "ViT-B-16": ("openvino", "onnxruntime"),  # 2.3-3.0x / 2.0-2.8x (224 px, batch 4, random init)
}


class RuntimeCacheError(ValueError):
    """A runtime cannot be used (not installed, export failed)."""


def available_runtimes() -> list[str]:
    """Concrete runtimes importable here (torch always)."""
    out = ["torch"]
    for name in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(name) is not None:
            out.append(name)
    return out


def resolve_runtime(runtime: str, backbone: str, device: torch.device) -> str:
    """``"auto"`` -> the runtime to use for ``backbone`` on ``device``; others are checked and returned."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    have = available_runtimes()
    if runtime == "auto":
        if device.type != "cpu":
            return "torch"
        return next((r for r in FASTER_ON_CPU.get(backbone, ()) if r in have), "torch")
    if runtime != "torch":
        if runtime not in have:
            extra = "onnx" if runtime == "onnxruntime" else "openvino"
            raise RuntimeCacheError(f"runtime {runtime!r} is not installed: pip install 'musc-fast[{extra}]'")
        if device.type != "cpu":
            raise RuntimeCacheError(f"runtime {runtime!r} runs on the CPU only here; use --device cpu "
                                    "or --runtime torch")
    return runtime


def cache_dir() -> Path:
    base = os.environ.get("MUSC_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "musc_fast")
    return Path(base) / "runtimes"


def _params_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model: Backbone, tag: str, dtype: torch.dtype) -> str:
    """The hash naming the exported graph of ``model`` (``tag``: the weights tag/path, informational)."""
    parts = [model.name, tag, str(model.image_size), ",".join(map(str, model.layers)), str(dtype),
             torch.__version__, str(FORMAT_VERSION), _params_hash(model)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class _Taps(torch.nn.Module):
    """The backbone as a plain-tuple graph: images [B,3,S,S] -> (tokens_0 .. tokens_{k-1}, cls)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        out = self.backbone(images, need_cls=True)
        return (*out.tokens, out.cls)


def export_onnx(model: Backbone, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Export ``model`` (eval, CPU) to ``path`` atomically, batch axis dynamic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(model.layers)
    names = [f"tokens_{i}" for i in range(k)] + ["cls"]
    s = model.image_size
    example = torch.zeros(2, 3, s, s, dtype=dtype)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Taps(model).eval(), (example,), tmp, input_names=["images"], output_names=names,
                              dynamic_axes={"images": {0: "B"}, **{n: {0: "B"} for n in names}},
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RuntimeBackbone:
    """Callable like a ``Backbone``: ``(images [B,3,S,S] torch, need_cls) -> BackboneOutput`` (CPU tensors).

    The graph always computes the image token; ``need_cls=False`` drops it.
    """

    def __init__(self, backbone: Backbone, runtime: str, *, tag: str = "", dtype: torch.dtype = torch.float32,
                 threads: int | None = None):
        if runtime not in ("onnxruntime", "openvino"):
            raise ValueError(f"RuntimeBackbone runs onnxruntime or openvino, got {runtime!r}")
        self.runtime, self.dtype = runtime, dtype
        self.name, self.layers = backbone.name, backbone.layers
        self.patch_size, self.image_size = backbone.patch_size, backbone.image_size
        self.preprocess = backbone.preprocess
        self.path = cache_dir() / f"{cache_key(backbone, tag, dtype)}.onnx"
        self.threads = threads
        cpu = backbone.to("cpu").eval()
        if not self.path.exists():
            export_onnx(cpu, self.path, dtype)
        try:
            self._run = self._load()
        except Exception as exc:  # a truncated or edited cache file: rebuild once
            warnings.warn(f"runtime cache {self.path} is unreadable ({type(exc).__name__}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
            export_onnx(cpu, self.path, dtype)
            self._run = self._load()

    def _load(self):
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            return lambda x: sess.run(None, {"images": x})
        from musc_fast.deploy.openvino_core import shared_core

        core = shared_core()  # one Core per process (see musc_fast/deploy/openvino_core.py)
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        compiled = core.compile_model(core.read_model(str(self.path)), "CPU", cfg)

        def run(x: np.ndarray):
            res = compiled(x)
            return [res[o] for o in compiled.outputs]
        return run

    def __call__(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        x = np.ascontiguousarray(images.detach().cpu().numpy())
        outs = [torch.from_numpy(np.array(o, copy=True)) for o in self._run(x)]
        return BackboneOutput(tokens=outs[:-1], cls=outs[-1] if need_cls else None)
