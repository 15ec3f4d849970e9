"""The planner: for every MSM pass, the mode, schedule, provider, precision and chunking, in one place.

A pass is one table of nearest similarities reduced by the interval mean. ``plan_pass`` returns a
``PassPlan`` (frozen, printable, JSON-able) and nothing else decides what runs:

* **mode**: ``full`` (the [N, L, N] table), ``streaming`` (row groups of ``MemoryPlan.stream_rows``),
  ``bank`` (new images against stored ones); sharded over torch.distributed ranks whenever there are
  several (``ranks``).
* **schedule**: ``pairs`` (each unordered pair once, both directions from one block) or ``rows`` (row
  groups, row maxima only: streaming, bank, and the aligned window's shift path).
* **provider** of the nearest-similarity primitive (``torch``, ``triton``, ``faiss``) and of the interval
  mean (``torch``, ``triton``). ``MUSC_FAST_MSM`` forces one (``ops.backend``); ``auto`` takes the
  Triton kernels for CUDA tensors of a kernel dtype when Triton imports, except at the precisions whose
  kernel path has no GPU timing (``ops.UNMEASURED_AUTO_PRECISIONS``). A provider that cannot run the
  pass (no aligned-window mask in the kernels or FAISS) gives it to torch, and ``reason`` says so.
* **op**: ``msm`` (one r) or ``onegram`` (every r of a layer from one Gram block: ``MUSC_FAST_BOXGRAM``,
  ``ops.boxgram.use_boxgram``, ``memory.fits_one_gram``; see ``use_onegram``).

Measured dispatch (``engine.dispatch``): given the pass's tokens (``sample``), under ``MUSC_FAST_MSM=auto``
the providers that qualify (``candidates``, the static choice first) are timed once on a slice of the
real work, checked against float64, and the fastest correct one is cached per GPU, versions and shape
bucket; ``MUSC_FAST_DISPATCH=static`` (and the CPU by default) keeps the static rule above.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass

import torch

from .. import distributed, ops
from ..memory import SHIFT_ROWS, BankPlan, MemoryPlan, fits_one_gram
from ..ops.boxgram import boxgram_mode, native_ok, use_boxgram
from ..ops.msm import DEFAULT_BLOCK_ELEMS, use_window_shifts
from . import nn_faiss, nn_torch, nn_triton

# nearest-similarity providers by name: each module has why_not / pairs_table / cross_table
NN_PROVIDERS = {m.NAME: m for m in (nn_torch, nn_triton, nn_faiss)}
OPS = ("msm", "onegram")
MODES = ("full", "streaming", "bank")
SCHEDULES = ("pairs", "rows")


@dataclass(frozen=True)
class PassPlan:
    """What one MSM pass runs.

    Attributes:
        op: ``msm`` (one [N, L, N] table) or ``onegram`` (``[R, N, L, N]``, every r from one Gram block).
        mode: ``full``, ``streaming`` or ``bank``.
        schedule: ``pairs`` (symmetric blocks) or ``rows`` (row groups of ``rows`` images).
        provider: nearest-similarity provider; interval: interval-mean provider.
        precision: MSM matmul precision (``MuScConfig.msm_precision``).
        block_elems: elements of one product block; rows: images per row group (``rows`` schedule);
        rows_per_chunk: rows per top-k of the torch interval mean.
        window: aligned window (None = full search). ranks: torch.distributed ranks sharing the tasks.
        r_list: the r axis of a one-Gram pass. reason: why this provider.
    """

    op: str
    mode: str
    schedule: str
    provider: str
    interval: str
    precision: str
    block_elems: int
    rows: int | None = None
    rows_per_chunk: int = 64
    window: int | None = None
    ranks: int = 1
    r_list: tuple[int, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        """One line, e.g. ``msm full/pairs torch+torch fp32 block=16777216 ranks=1 (auto: CPU tensors)``."""
        parts = [self.op + (f" r={','.join(map(str, self.r_list))}" if self.r_list else ""),
                 f"{self.mode}/{self.schedule}" + (f"({self.rows} rows)" if self.rows else ""),
                 f"{self.provider}+{self.interval}", self.precision, f"block={self.block_elems}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        parts.append(f"ranks={self.ranks}")
        return " ".join(parts) + (f" ({self.reason})" if self.reason else "")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["r_list"] = list(self.r_list)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PassPlan":
        """Inverse of ``as_dict``; other keys (``Result.plan``'s subset, layer, r) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["r_list"] = tuple(kw.get("r_list", ()))
        return cls(**kw)


def _env_choice() -> str:
    return os.environ.get("MUSC_FAST_MSM", "auto").strip().lower()


def _auto_reason(which: str, device: torch.device, dtype: torch.dtype | None, precision: str) -> str:
    if which == "triton":
        return "auto: Triton on CUDA"
    if device.type != "cuda":
        return "auto: CPU tensors"
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"auto: {dtype} is not a kernel dtype"
    if precision in ops.UNMEASURED_AUTO_PRECISIONS:
        return f"auto: the {precision} kernel path has no GPU timing yet"
    return "auto: Triton cannot run here"


def candidates(schedule: str, window: int | None, device, dtype: torch.dtype | None,
               precision: str) -> list[str]:
    """Providers that can run a pass of this kind here, the static choice first (the hook for measured
    dispatch: a timing step may pick another of these; anything else would be a hidden switch)."""
    first, _ = choose_provider(schedule, window, device, dtype, precision)
    dev = torch.device(device)
    rest = [name for name, mod in NN_PROVIDERS.items()
            if name != first and mod.why_not(schedule, window, dev, precision) is None]
    return [first] + rest


def choose_provider(schedule: str, window: int | None, device, dtype: torch.dtype | None,
                    precision: str, *, sample: torch.Tensor | None = None,
                    block_elems: int = DEFAULT_BLOCK_ELEMS) -> tuple[str, str]:
    """(provider, reason) of the nearest-similarity step. Raises like ``ops.backend`` for a forced
    provider that cannot run at all (``MUSC_FAST_MSM=triton`` without Triton, ``=faiss`` without faiss).

    ``sample``: the pass's tokens [N, L, C]. Given, under ``MUSC_FAST_MSM=auto`` and with measured
    dispatch on (``engine.dispatch``: CUDA by default, ``MUSC_FAST_DISPATCH=measure`` anywhere), the
    qualifying providers are timed on a slice of it once (or read from the dispatch cache) and the
    fastest one within the precision's error bound runs."""
    dev = torch.device(device)
    which = ops.backend("msm", dev, dtype, precision)
    env = _env_choice()
    reason = _auto_reason(which, dev, dtype, precision) if env == "auto" else f"MUSC_FAST_MSM={env}"
    why = NN_PROVIDERS[which].why_not(schedule, window, dev, precision)
    if why is not None:
        which, reason = "torch", f"{reason}; {which} {why}: torch"
    if env == "auto" and sample is not None:
        measured = _measured(schedule, window, dev, dtype, precision, sample, block_elems)
        if measured is not None:
            return measured
    return which, reason


DISPATCH_SLICE = 4  # images of the slice measured dispatch times the providers on (6 image pairs)


def _measured(schedule, window, dev, dtype, precision, sample, block_elems) -> tuple[str, str] | None:
    """(winner, reason) from ``dispatch.choose`` over the qualifying providers, or None when measuring
    is off or only one provider qualifies. The key is the one ``musc-fast tune`` fills."""
    from . import dispatch

    if dispatch.dispatch_mode(dev) != "measure" or precision not in dispatch.SIMILARITY_ERROR_BOUND:
        return None
    names = candidates(schedule, window, dev, dtype, precision)
    if len(names) < 2:
        return None
    zs = sample[:DISPATCH_SLICE]
    calls = {name: functools.partial(_run_candidate, name, zs, precision, block_elems) for name in names}
    key = dispatch.DispatchKey.for_pass("nearest_similarity", tuple(sample.shape), precision, dev)
    choice = dispatch.choose(key, calls, similarity_reference(zs), dispatch.SIMILARITY_ERROR_BOUND[precision],
                             static_choice=names)
    timing = ", ".join(f"{k} {v:.3g} ms" for k, v in choice.ms.items())
    return choice.winner, f"measured{' (cached)' if choice.from_cache else ''}: {timing or choice.winner}"


def _run_candidate(name: str, z: torch.Tensor, precision: str, block_elems: int) -> torch.Tensor:
    # a kernel that falls back to torch would be timed under the kernel's name: make that a failure
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        return NN_PROVIDERS[name].pairs_table(z, None, precision=precision, window=None, block_elems=block_elems)


def similarity_reference(z: torch.Tensor) -> torch.Tensor:
    """sim [N, L, N] float64: ``max_q <z_i[p], z_j[q]>`` for j != i, -inf for j == i (a slice's reference)."""
    z64 = z.double()
    n, length, _ = z.shape
    sim = torch.full((n, length, n), float("-inf"), dtype=torch.float64, device=z.device)
    for i in range(n):
        for j in range(i + 1, n):
            prod = z64[i] @ z64[j].T
            sim[i, :, j] = prod.amax(dim=1)
            sim[j, :, i] = prod.amax(dim=0)
    return sim


def use_onegram(n: int, length: int, c: int, r_list, *, device, window: int | None,
                memory: MemoryPlan) -> tuple[bool, str]:
    """(whether a layer is scored by one Gram block for every r, why)."""
    dev = torch.device(device)
    if len(tuple(r_list)) < 1:
        return False, "no r"
    if window is not None:
        return False, "aligned window: per-r passes"
    if not use_boxgram(dev, c):
        return False, f"MUSC_FAST_BOXGRAM={boxgram_mode()} (C={c}, {dev.type}): per-r passes"
    which = ops.backend("msm", dev)
    if which == "faiss":
        return False, "faiss has no one-Gram path: per-r passes"
    if which == "triton" and boxgram_mode() != "on":
        return False, "the one-Gram kernels run only under MUSC_FAST_BOXGRAM=1 (untimed on GPU): per-r passes"
    if not fits_one_gram(memory, n, length, c, len(tuple(r_list))):
        return False, "the one-Gram tables do not fit the memory plan: per-r passes"
    return True, f"MUSC_FAST_BOXGRAM={boxgram_mode()}"


def plan_pass(op: str, *, n: int, length: int, device, dtype: torch.dtype | None = torch.float32,
              precision: str = "fp32", window: int | None = None, memory: MemoryPlan | BankPlan | None = None,
              r_list=(), bank: bool = False, sample: torch.Tensor | None = None) -> PassPlan:
    """The plan of one pass of ``op`` (``msm`` or ``onegram``) over N images of L patches.

    Args:
        memory: the chunk sizes (``MemoryPlan``; a ``BankPlan`` with ``bank=True``). Default: defaults.
        bank: new images against a bank (mode ``bank``; ``n`` = new images in one block).
        r_list: the r axis of a one-Gram pass.
        sample: the pass's tokens, for measured dispatch (``choose_provider``); None: the static rule.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    dev = torch.device(device)
    ranks = distributed.world_size()
    if bank:
        if not isinstance(memory, BankPlan):
            raise ValueError("a bank pass needs a memory.BankPlan")
        provider, reason = choose_provider("rows", window, dev, dtype, precision, sample=sample,
                                           block_elems=memory.block_elems)
        return PassPlan(op="msm", mode="bank", schedule="rows", provider=provider,
                        interval="triton" if provider == "triton" else "torch", precision=precision,
                        block_elems=memory.block_elems, rows=memory.query_block,
                        rows_per_chunk=memory.rows_per_chunk, window=window, ranks=1, reason=reason)
    memory = memory or MemoryPlan()
    if op == "onegram":
        which = ops.backend("msm", dev, dtype, precision)
        provider = "triton" if which == "triton" and boxgram_mode() == "on" else "torch"
        reason = f"MUSC_FAST_MSM={_env_choice()}, MUSC_FAST_BOXGRAM={boxgram_mode()}"
        if provider == "torch":
            native, why = native_ok(dev)
            provider = "native" if native else "torch"
            reason = f"{reason}; {why}"
        return PassPlan(op="onegram", mode="full", schedule="pairs", provider=provider,
                        interval="triton" if provider == "triton" else "torch", precision=precision,
                        block_elems=memory.block_elems, rows_per_chunk=memory.rows_per_chunk, ranks=ranks,
                        r_list=tuple(int(r) for r in r_list), reason=reason)
    if memory.stream_rows is not None:
        mode, schedule, rows = "streaming", "rows", memory.stream_rows
    elif window is not None and use_window_shifts(window, length):
        mode, schedule, rows = "full", "rows", SHIFT_ROWS
    else:
        mode, schedule, rows = "full", "pairs", None
    provider, reason = choose_provider(schedule, window, dev, dtype, precision, sample=sample,
                                       block_elems=memory.block_elems)
    return PassPlan(op="msm", mode=mode, schedule=schedule, provider=provider,
                    interval="triton" if provider == "triton" else "torch", precision=precision,
                    block_elems=memory.block_elems, rows=rows, rows_per_chunk=memory.rows_per_chunk,
                    window=window, ranks=ranks, reason=reason)


def summarize(plans) -> list[str]:
    """Distinct ``describe()`` lines of a run's pass plans (dicts or PassPlans), with counts, in order."""
    counts: dict[str, int] = {}
    for p in plans:
        line = (p if isinstance(p, PassPlan) else PassPlan.from_dict(p)).describe()
        counts[line] = counts.get(line, 0) + 1
    return [f"{k} x {line}" for line, k in counts.items()]
