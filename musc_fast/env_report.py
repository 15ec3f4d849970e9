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
    lines += engine_plan_lines(device)
    from .backbones.attention import attention_backend

    lines.append(f"attention on {device}: {attention_backend(device)}")
    from .kernels import available as kernels_available

    ok, why = kernels_available()
    lines.append(f"triton kernels: {'available' if ok else 'off'}" + ("" if ok else f" ({why})"))
    switches = {k: v for k, v in os.environ.items() if k.startswith("MUSC_FAST_") or k == "TRITON_INTERPRET"}
    lines.append("env switches: " + (", ".join(f"{k}={v}" for k, v in sorted(switches.items())) or "none set"))
    lines.append("backbones: " + ", ".join(backbones()))
    return "\n".join(lines)


def engine_plan_lines(device: str) -> list[str]:
    """What the engine's planner would choose here for the MSM passes of a paper-sized set (N=200,
    ViT-L at 518 px: L=1369, C=1024), per precision and mode (``engine.plan_pass``)."""
    from . import engine
    from .memory import MemoryPlan

    lines = []
    shape = dict(n=200, length=1369, device=device)
    for precision in ("fp32", "bf16"):
        for label, kw in (("full", {}), ("streaming", {"memory": MemoryPlan(stream_rows=16)}),
                          ("aligned window 2", {"window": 2})):
            try:
                pp = engine.plan_pass("msm", precision=precision, **shape, **kw)
                lines.append(f"plan msm {label} {precision} on {device}: {pp.describe()}")
            except (RuntimeError, ValueError) as exc:
                lines.append(f"plan msm {label} {precision} on {device}: error: {exc}")
    try:
        ok, why = engine.use_onegram(200, 1369, 1024, (1, 3, 5), device=device, window=None, memory=MemoryPlan())
        lines.append(f"plan one-Gram (C=1024) on {device}: {'yes' if ok else 'no'} ({why})")
    except (RuntimeError, ValueError) as exc:
        lines.append(f"plan one-Gram on {device}: error: {exc}")
    return lines
