"""``musc-fast env``: versions, devices and which kernels/backends are active (Liger-Kernel's habit)."""
from __future__ import annotations

import importlib
import os
import platform

OPTIONAL_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "triton", "open_clip", "timm", "faiss",
                     "xformers", "PIL", "safetensors", "openpyxl")


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # any import failure means "not usable here"
        return f"not available ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "installed"))


def env_report() -> str:
    import torch

    from . import __version__, ops
    from .backbones import available as backbones

    lines = [f"musc_fast {__version__}", f"python {platform.python_version()} on {platform.platform()}",
             f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads {torch.get_num_threads()}"]
    lines += [f"{name:<12} {_version(name)}" for name in OPTIONAL_PACKAGES]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("cuda: not available (CPU only)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for op in ("msm", "lnamd"):
        try:
            lines.append(f"{op} backend on {device}: {ops.backend(op, device)}")
        except (RuntimeError, ValueError) as exc:
            lines.append(f"{op} backend on {device}: error: {exc}")
    from .backbones.attention import attention_backend

    lines.append(f"attention on {device}: {attention_backend(device)}")
    from .kernels import available as kernels_available

    ok, why = kernels_available()
    lines.append(f"triton kernels: {'available' if ok else 'off'}" + ("" if ok else f" ({why})"))
    switches = {k: v for k, v in os.environ.items() if k.startswith("MUSC_FAST_") or k == "TRITON_INTERPRET"}
    lines.append("env switches: " + (", ".join(f"{k}={v}" for k, v in sorted(switches.items())) or "none set"))
    lines.append("backbones: " + ", ".join(backbones()))
    return "\n".join(lines)
