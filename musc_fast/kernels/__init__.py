"""Optional fast backends for the hot ops: Triton kernels (GPU; CPU under TRITON_INTERPRET=1) and FAISS.

Nothing here imports triton or faiss at import time: ``import musc_fast`` works without either. The
gate in ``musc_fast.ops`` asks ``available()`` / ``faiss_available()`` and then calls the wrappers below,
which import their kernel module on first use.

Kernel modules are decorated once, in the Triton mode (compiled or interpreted) that TRITON_INTERPRET
selects when they are imported; each records it in ``INTERPRETED``. If the variable changes later in the
process (tests switch the interpreter on), the module is re-imported so that the kernels match it.
"""
from __future__ import annotations

import importlib
import math
import os

import torch

_TRUE = ("1", "true", "on", "yes")

__all__ = [
    "available", "faiss_available", "bf16_split", "grid_side", "lnamd_triton", "nearest_similarity_triton",
    "interval_mean_triton", "mutual_scores_triton", "nearest_similarity_multi_triton", "nearest_similarity_faiss",
    "cross_similarity_faiss",
]


# ---- host-side helpers (pure torch): the kernels take grid side and norms as arguments, so nothing in
# kernels/ imports from the layers above it; ops/ re-exports bf16_split for its torch emulation.


def bf16_split(z: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """z (any float dtype) -> [parts, *z.shape] bfloat16 with z ~= sum of the parts (each the bf16 rounding
    of what the previous parts leave; the residues are exact in fp32). Three parts carry 24 bits, fp32's
    mantissa: the exact-mode Triton kernel multiplies them on bf16 tensor cores (kernels/mutual_min.py)."""
    rest = z.float()
    out = []
    for _ in range(parts):
        part = rest.to(torch.bfloat16)
        out.append(part)
        rest = rest - part.float()
    return torch.stack(out)


def grid_side(length: int, grid: int | None = None) -> int:
    """G for L = G * G patches (``grid`` when the caller knows it); a non-square count is an error with
    the same words as ``ops.lnamd.grid_of``."""
    g = math.isqrt(length) if grid is None else int(grid)
    if g * g != length:
        raise ValueError(f"LNAMD needs a square patch grid, got L={length} tokens (not a square number)")
    return g


def env_switch(name: str) -> str:
    """A three-way environment switch (``MUSC_FAST_BOXGRAM``, ``MUSC_FAST_NATIVE``): ``auto`` (unset or
    ``auto``), ``on`` (``1``/``true``/``on``) or ``off`` (``0``/``false``/``off``); anything else is an error."""
    value = os.environ.get(name, "auto").strip().lower()
    modes = {"auto": "auto", "1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off"}
    if value not in modes:
        raise ValueError(f"{name}={value!r} must be auto, 1 or 0")
    return modes[value]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def available() -> tuple[bool, str]:
    """(can the Triton kernels run here, why / why not). True when triton imports and either a CUDA
    device is present or TRITON_INTERPRET=1 (then the kernels take CPU tensors)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if _interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors"
    import torch

    if torch.cuda.is_available():
        return True, f"Triton on CUDA ({torch.cuda.get_device_name()})"
    return False, "no CUDA device and TRITON_INTERPRET is not set"


def faiss_available() -> tuple[bool, str]:
    """(can the FAISS nearest-neighbour provider run, why / why not)."""
    try:
        import faiss  # noqa: F401
    except Exception as exc:
        return False, f"faiss cannot be imported ({type(exc).__name__}: {exc}); pip install faiss-cpu"
    return True, "faiss"


def _module(name: str):
    mod = importlib.import_module(f"{__name__}.{name}")
    if getattr(mod, "INTERPRETED", None) != _interpreting():
        mod = importlib.reload(mod)
    return mod


def lnamd_triton(tokens, r_list, **kwargs):
    """LNAMD for every r of ``r_list``: [N, L, C] -> list of [N, L, C]. See ``kernels.lnamd``."""
    return _module("lnamd").lnamd_triton(tokens, r_list, **kwargs)


def nearest_similarity_triton(z, *, precision: str = "fp32", **kwargs):
    """[N, L, C] (or [P, N, L, C]) -> sim [N, L, N] (or [P, N, L, N]) fp32. See ``kernels.mutual_min``."""
    return _module("mutual_min").nearest_similarity_triton(z, precision=precision, **kwargs)


def nearest_similarity_multi_triton(x, r_list, *, inv_norms, precision: str = "fp32", **kwargs):
    """LayerNorm'd x [N, L, C] + 1/||B_r x|| [R, N, L] -> sim [R, N, L, N] fp32 for every r from one Gram
    block per pair. See ``kernels.boxgram``."""
    return _module("boxgram").nearest_similarity_multi_triton(x, r_list, inv_norms=inv_norms, precision=precision,
                                                              **kwargs)


def interval_mean_triton(sim, k_min: int, k_max: int, **kwargs):
    """sim [N, L, N] (or [P, N, L, N]) -> [N, L] float64 interval mean. See ``kernels.interval_mean``."""
    return _module("interval_mean").interval_mean_triton(sim, k_min, k_max, **kwargs)


def mutual_scores_triton(z, k_min: int, k_max: int, *, precision: str = "fp32", out=None,
                         accumulate: bool = False):
    """MSM scores with both kernels: z [N, L, C] or [P, N, L, C] -> [N, L] float64, summed over the P
    passes (added to ``out`` when ``accumulate``). Divide by P (and the pass count) for the mean."""
    sim = nearest_similarity_triton(z, precision=precision)
    return interval_mean_triton(sim, k_min, k_max, out=out, accumulate=accumulate)


def nearest_similarity_faiss(z, **kwargs):
    """[N, L, C] -> sim [N, L, N] fp32 with FAISS exact inner-product search. See ``kernels.faiss_nn``."""
    from .faiss_nn import nearest_similarity_faiss as impl

    return impl(z, **kwargs)


def cross_similarity_faiss(zq, zr):
    """[b, L, C] x [m, L, C] -> [b, L, m] fp32 best inner products (one direction). See ``kernels.faiss_nn``."""
    from .faiss_nn import cross_similarity_faiss as impl

    return impl(zq, zr)
