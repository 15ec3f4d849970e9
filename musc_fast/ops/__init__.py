"""Public algorithm steps, each dispatched to the fastest exact backend available.

``lnamd``, ``mutual_scores`` and ``rscin`` are the names other tools embed. Each hot op picks its
backend here (DESIGN 3): ``MUSC_FAST_<OP>=torch`` forces the torch path, ``=triton`` forces the Triton
kernel (also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses the kernel on CUDA
when Triton is importable and the torch path everywhere else; ``MUSC_FAST_MSM=faiss`` uses FAISS for the
nearest-neighbour step (see ``backend`` and ENV.md). Inputs may be numpy arrays or tensors;
numpy in gives numpy out.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .interval import SmallBatchWarning, interval_bounds
from .lnamd import lnamd_multi_torch, lnamd_torch
from .maps import maps_and_image_scores, upsample_maps
from .msm import interval_mean_from_similarity, mutual_scores_torch, nearest_similarity_torch
from .rscin import rscin

__all__ = [
    "lnamd", "lnamd_multi", "mutual_scores", "nearest_similarity", "rscin", "interval_bounds",
    "interval_mean_from_similarity", "upsample_maps", "maps_and_image_scores", "backend",
    "SmallBatchWarning", "KernelFallbackWarning",
]

# Allowed values of MUSC_FAST_<OP> per op; "faiss" is a provider for MSM's nearest-neighbour step only.
_BACKENDS = {"msm": ("auto", "torch", "triton", "faiss"), "lnamd": ("auto", "torch", "triton")}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# MSM precisions whose kernel path has no GPU timing yet: ``auto`` sends them to torch (cuBLAS, TF32 off)
# until a measurement (bench/gpu_check.sh) says the kernel is faster.
UNMEASURED_AUTO_PRECISIONS = ("fp32", "fp32-ieee")


def backend(op: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            precision: str | None = None) -> str:
    """The backend ``op`` (``"msm"`` or ``"lnamd"``) will use for tensors on ``device``.

    ``MUSC_FAST_<OP>``: ``auto`` (default) = the Triton kernel for CUDA tensors of a kernel dtype
    (fp32/fp16/bf16) when Triton is importable, the torch path otherwise; ``torch`` = always torch;
    ``triton`` = always the kernel (CPU tensors need ``TRITON_INTERPRET=1``), an error if it cannot run;
    ``faiss`` (msm only) = FAISS exact search for the nearest-neighbour step, an error if faiss is missing.
    ``precision`` (msm): under ``auto``, an MSM precision in ``UNMEASURED_AUTO_PRECISIONS`` (the exact
    modes) goes to torch even on CUDA.
    """
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_BACKENDS)}")
    env = f"MUSC_FAST_{op.upper()}"
    choice = os.environ.get(env, "auto").strip().lower()
    if choice not in _BACKENDS[op]:
        raise ValueError(f"{env}={choice!r} is not one of {', '.join(_BACKENDS[op])}")
    if choice == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto" and not (on_cuda and (dtype is None or dtype in _KERNEL_DTYPES)):
        return "torch"  # decided without importing triton
    if choice == "auto" and op == "msm" and precision in UNMEASURED_AUTO_PRECISIONS:
        return "torch"
    from .. import kernels

    if choice == "faiss":
        ok, why = kernels.faiss_available()
        if not ok:
            raise RuntimeError(f"{env}=faiss but FAISS cannot run here: {why}")
        return "faiss"
    ok, why = kernels.available()
    if choice == "triton":
        if not ok:
            raise RuntimeError(f"{env}=triton but the Triton kernels cannot run here: {why}")
        if not on_cuda and not kernels._interpreting():
            raise RuntimeError(f"{env}=triton with tensors on {device}: compiled kernels need CUDA tensors "
                               "(set TRITON_INTERPRET=1 to run them on CPU with the Triton interpreter)")
        return "triton"
    return "triton" if ok else "torch"


# ---- never crash a run because a kernel failed -----------------------------------------------------------


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed its first-use probe (or a call): the torch path is used for it from now on."""


# Devices whose first kernel use is probed against torch. CUDA only by default (the interpreter is for
# tests, and the probes would cost it seconds); tests/test_kernel_fallback.py adds "cpu".
PROBE_DEVICES = ["cuda"]
_KERNEL_STATE: dict[tuple, str | None] = {}  # kernel key -> None (probe passed) or why it is off


def _probe_input(n: int, length: int, c: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, length, c, generator=gen)
    return x.to(device)


# Probe tolerances per MSM precision (similarities, |kernel - torch fp32|): fp32 rounding; one rounding of
# C=20 unit-row products to 8 / 11 bits, with margin.
_PROBE_ATOL = {"fp32": 1e-5, "fp32-ieee": 1e-5, "tf32": 5e-3, "bf16": 3e-2, "fp16": 4e-3}


def _probe(key: tuple, device) -> None:
    """Run kernel ``key`` once on a small input and compare with the torch path; raise on any mismatch."""
    from .. import kernels
    from .boxgram import box_inverse_norms, nearest_similarity_multi_torch
    from .lnamd import layer_norm_chw

    name, precision = key[0], (key[1] if len(key) > 1 else "fp32")
    atol = _PROBE_ATOL.get(precision, 1e-5)
    if name == "lnamd":
        x = _probe_input(2, 25, 20, device) * 3.0 + 1.0
        got, want = kernels.lnamd_triton(x, [1, 3]), lnamd_multi_torch(x, [1, 3])
        pairs = list(zip(got, want))
        atol = 1e-5
    elif name == "mutual_min":
        z = torch.nn.functional.normalize(_probe_input(3, 25, 20, device), dim=-1)
        pairs = [(kernels.nearest_similarity_triton(z, precision=precision), nearest_similarity_torch(z))]
    elif name == "interval_mean":
        sim = nearest_similarity_torch(torch.nn.functional.normalize(_probe_input(4, 25, 20, device), dim=-1))
        pairs = [(kernels.interval_mean_triton(sim, 0, 2), interval_mean_from_similarity(sim, 0, 2))]
        atol = 1e-9
    elif name == "boxgram":
        x = layer_norm_chw(_probe_input(3, 25, 20, device))
        pairs = [(kernels.nearest_similarity_multi_triton(x, (1, 3), inv_norms=box_inverse_norms(x, (1, 3)),
                                                          grid=5, precision=precision),
                  nearest_similarity_multi_torch(x, (1, 3)))]
    else:
        raise ValueError(f"no probe for kernel {key!r}")
    for got, want in pairs:
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            raise RuntimeError(f"shape {tuple(got.shape)} != torch's {tuple(want.shape)}")
        finite = torch.isfinite(want)
        if not torch.equal(torch.isfinite(got), finite):
            raise RuntimeError("non-finite entries differ from the torch path")
        err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
        if not err <= atol:  # also catches NaN
            raise RuntimeError(f"max |kernel - torch| = {err:.3g} > {atol:.3g}")


def _disable(key: tuple, why: str) -> None:
    _KERNEL_STATE[key] = why
    warnings.warn(f"Triton kernel {'/'.join(key)} disabled, using the torch path from now on: {why}",
                  KernelFallbackWarning, stacklevel=4)


def kernel_ok(key: tuple, device) -> bool:
    """Whether kernel ``key`` (e.g. ("mutual_min", "bf16")) may run: on its first use on a probed device
    in this process it runs once on a small input against torch; a failure (exception, or numbers off
    by more than the dtype tolerance) gives one ``KernelFallbackWarning`` and turns it off for good."""
    if key in _KERNEL_STATE:
        return _KERNEL_STATE[key] is None
    if torch.device(device).type not in PROBE_DEVICES:
        return True
    try:
        _probe(key, device)
    except Exception as exc:  # compile errors, launch failures, wrong numbers: all mean "use torch"
        _disable(key, f"{type(exc).__name__}: {exc}"[:500])
        return False
    _KERNEL_STATE[key] = None
    return True


def run_kernel(key: tuple, device, kernel_call, torch_call):
    """``kernel_call()`` if kernel ``key`` is usable, else ``torch_call()``; a kernel that raises later
    (a specialisation the probe did not build) is turned off (one warning) and torch answers this call.
    Input errors (ValueError, TypeError) are the caller's and propagate."""
    if kernel_ok(key, device):
        try:
            return kernel_call()
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            _disable(key, f"{type(exc).__name__}: {exc}"[:500])
    return torch_call()


def _to_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.from_numpy(np.ascontiguousarray(x)), True


def _back(x: torch.Tensor, was_numpy: bool):
    return x.cpu().numpy() if was_numpy else x


def lnamd(tokens, r: int):
    """LNAMD features of one layer (SPEC 2).

    Args:
        tokens: [N, L, C] patch tokens of one layer, CLS removed, L = G*G row-major.
        r: odd aggregation degree.
    Returns:
        Z [N, L, C] float32: LayerNorm over (C, G, G) per image, r x r zero-padded box mean,
        L2-normalised rows.
    """
    t, was_np = _to_tensor(tokens)
    if backend("lnamd", t.device, t.dtype) == "triton":
        from .. import kernels

        return _back(run_kernel(("lnamd",), t.device, lambda: kernels.lnamd_triton(t, [r])[0],
                                lambda: lnamd_torch(t, r)), was_np)
    return _back(lnamd_torch(t, r), was_np)


def lnamd_multi(tokens, r_list) -> list:
    """LNAMD for every r of ``r_list`` from one read of the tokens; one [N, L, C] float32 per r."""
    t, was_np = _to_tensor(tokens)
    if backend("lnamd", t.device, t.dtype) == "triton":
        from .. import kernels

        outs = run_kernel(("lnamd",), t.device, lambda: kernels.lnamd_triton(t, list(r_list)),
                          lambda: lnamd_multi_torch(t, r_list))
        return [_back(z, was_np) for z in outs]
    return [_back(z, was_np) for z in lnamd_multi_torch(t, r_list)]


def nearest_similarity(z, *, precision: str = "fp32"):
    """sim [N, L, N] float32: ``sim[i, p, j] = max_q <Z_i[p], Z_j[q]>``, -inf where j == i."""
    t, was_np = _to_tensor(z)
    return _back(_nearest_similarity(t, precision, backend("msm", t.device, t.dtype, precision)), was_np)


def _nearest_similarity(t: torch.Tensor, precision: str, which: str) -> torch.Tensor:
    if which == "triton":
        from .. import kernels

        return run_kernel(("mutual_min", precision), t.device,
                          lambda: kernels.nearest_similarity_triton(t, precision=precision),
                          lambda: nearest_similarity_torch(t, precision=precision))
    if which == "faiss":
        from ..kernels import nearest_similarity_faiss

        return nearest_similarity_faiss(t, precision=precision)
    return nearest_similarity_torch(t, precision=precision)


def mutual_scores(z, topmin: tuple[float, float] = (0.0, 0.3), *, compat: bool = False,
                  precision: str = "fp32"):
    """MSM patch scores of one (r, layer) pass (SPEC 3).

    Args:
        z: [N, L, C] unit rows (the output of ``lnamd``).
        topmin: which sorted per-image nearest distances to average; default the floor(0.3 (N-1))
            smallest. Values < 1 are fractions of N-1, values >= 1 counts (SPEC 3.2).
        compat: N <= 4 gives NaN like the original instead of averaging the single nearest image.
        precision: ``"fp32"`` exact, ``"bf16"``/``"fp16"`` tensor-core matmuls on GPU.
    Returns:
        [N, L] float64.
    """
    t, was_np = _to_tensor(z)
    which = backend("msm", t.device, t.dtype, precision)
    if which == "torch":
        return _back(mutual_scores_torch(t, topmin, compat=compat, precision=precision), was_np)
    k_min, k_max = interval_bounds(t.shape[0] - 1, topmin, compat=compat)
    sim = _nearest_similarity(t, precision, which)
    if which == "triton":
        return _back(interval_mean(sim, k_min, k_max), was_np)
    return _back(interval_mean_from_similarity(sim, k_min, k_max), was_np)


def interval_mean(sim: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """The interval-mean kernel (guarded by ``run_kernel``) or the torch top-k path: [N, L, N] -> [N, L]."""
    from .. import kernels

    return run_kernel(("interval_mean",), sim.device, lambda: kernels.interval_mean_triton(sim, k_min, k_max),
                      lambda: interval_mean_from_similarity(sim, k_min, k_max))
