"""Measured dispatch: which provider runs a pass, timed once on this machine and remembered.

As cuDNN's benchmark mode or Triton's autotuner, but across providers (torch / triton / faiss): where
several qualify for a pass, ``choose`` runs each on a small slice of the real work, drops any that
raises or whose max |error| against a reference exceeds the precision's bound, keeps the fastest of
the rest and stores the decision in a JSON cache, keyed by ``DispatchKey`` (device name, driver /
torch / triton / musc_fast versions, shape bucket, precision, pass kind). The next run with the same
key reads the winner back without measuring.

Switch (``MUSC_FAST_DISPATCH``, ENV.md): ``auto`` (default) measures on CUDA and uses the static order
on the CPU (there only the torch provider qualifies for real runs: Triton needs its slow interpreter
and FAISS is opt-in, and timings on shared CPU cores are noise); ``measure`` always measures;
``static`` never measures nor touches the cache: the first name of the caller's ``static_choice``
order that is a candidate wins.

Cache: ``<cache folder>/dispatch-v<CACHE_VERSION>.json`` (the folder of ``MUSC_FAST_CACHE``, see
``musc_fast.runtimes``), written atomically; an unreadable or corrupt file is ignored with one
``DispatchCacheWarning`` and rewritten by the next store; entries of other versions never match a key.

Under torch.distributed with several ranks, ``choose`` is collective: rank 0 decides (cache or
measurement) and broadcasts, so every rank runs the same provider; only rank 0 writes the cache.
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

DISPATCH_ENV = "MUSC_FAST_DISPATCH"
DISPATCH_MODES = ("auto", "measure", "static")
CACHE_VERSION = 1  # file layout; a new layout gets a new file name, so versions never mix

# Max |similarity error| allowed per MSM precision against a float64 reference, for unit rows.
# 16-bit inputs: each is rounded once (unit roundoff u), so |sum x_i y_i - sum x~_i y~_i| <= 2u sum
# |x_i y_i| <= 2u (Cauchy-Schwarz on unit rows), and a max over q moves by no more than its terms do.
# Plus 1e-5 for fp32 accumulation: the project's fp32 bar (real fp32 errors are ~1e-7, TF32 ~1e-4).
SIMILARITY_ERROR_BOUND = {"fp32": 1e-5, "fp32-ieee": 1e-5, "fp16": 2 * 2.0 ** -11 + 1e-5,
                          "bf16": 2 * 2.0 ** -8 + 1e-5}


class DispatchCacheWarning(RuntimeWarning):
    """The dispatch cache file could not be read or written; decisions are measured again."""


class NoCorrectProviderError(RuntimeError):
    """Every candidate of a pass raised or missed the error bound."""


# ---- key -------------------------------------------------------------------------------------------


def bucket(x: int) -> int:
    """The power of two >= x (x >= 1): shapes in one bucket share a decision."""
    x = int(x)
    if x < 1:
        raise ValueError(f"shape sizes must be >= 1, got {x}")
    return 1 << (x - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    """The NVIDIA driver version (pynvml when installed), else the CUDA driver API version."""
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # not installed, or no NVML: ask libcuda
        pass
    try:
        import ctypes

        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"cuda-driver-{v.value}"
    except Exception:
        pass
    return "unknown"


def _musc_fast_version() -> str:
    # From the installed metadata, not ``musc_fast.__version__``: importing the package root from here
    # would close an import circle (the root imports the pipeline, which uses the engine).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("musc-fast")
    except PackageNotFoundError:  # a bare source checkout
        return "unknown"


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed or broken: the key says so
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


@dataclass(frozen=True)
class DispatchKey:
    """What a decision depends on. ``n``, ``l``, ``c`` are buckets (``bucket``), not raw sizes.

    Build it with ``DispatchKey.for_pass``; on the CPU ``device`` is ``"cpu"`` and ``driver`` ``"-"``.
    """

    pass_kind: str
    precision: str
    n: int
    l: int  # noqa: E741 - the project's name for the token count
    c: int
    device: str
    driver: str
    torch: str
    triton: str
    musc_fast: str

    @classmethod
    def for_pass(cls, pass_kind: str, shape: Sequence[int], precision: str,
                 device: torch.device | str = "cpu") -> "DispatchKey":
        """Key of a pass over tokens of ``shape`` = (N, L, C) in ``precision`` on ``device``."""
        n, length, c = (int(s) for s in shape)
        dev = torch.device(device)
        if dev.type == "cuda":
            name, driver = torch.cuda.get_device_name(dev), _driver_version()
        else:
            name, driver = dev.type, "-"
        return cls(pass_kind=pass_kind, precision=precision, n=bucket(n), l=bucket(length), c=bucket(c),
                   device=name, driver=driver, torch=torch.__version__, triton=_triton_version(),
                   musc_fast=_musc_fast_version())

    @property
    def shape_bucket(self) -> str:
        return f"N{self.n} L{self.l} C{self.c}"

    def as_str(self) -> str:
        """Stable text of every field: the cache's entry name."""
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())


# ---- mode ------------------------------------------------------------------------------------------


def dispatch_mode(device: torch.device | str = "cpu") -> str:
    """``"measure"`` or ``"static"`` for work on ``device``, from ``MUSC_FAST_DISPATCH`` (module doc)."""
    value = os.environ.get(DISPATCH_ENV, "auto").strip().lower() or "auto"
    if value not in DISPATCH_MODES:
        raise ValueError(f"{DISPATCH_ENV}={value!r} is not one of {', '.join(DISPATCH_MODES)}")
    if value == "auto":
        return "measure" if torch.device(device).type == "cuda" else "static"
    return value


# ---- cache -----------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``<cache folder>/dispatch-v<CACHE_VERSION>.json``; the folder is the one of ``MUSC_FAST_CACHE``."""
    from ..runtimes.runtime import cache_dir

    return cache_dir().parent / f"dispatch-v{CACHE_VERSION}.json"  # cache_dir() is <folder>/runtimes


_WARNED: set[tuple] = set()  # (path, mtime, size) of bad files already warned about in this process


class DispatchCache:
    """The JSON file of decisions: ``{"version": 1, "entries": {key.as_str(): entry}}``.

    An entry is ``Choice.to_dict()`` plus ``"key"`` (the key's fields) and ``"when"`` (UTC time).
    Read on every ``get`` (it is small); ``put`` reads, merges and rewrites it atomically.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()

    def _warn_once(self, why: str) -> None:
        try:
            st = self.path.stat()
            ident = (str(self.path), st.st_mtime_ns, st.st_size)
        except OSError:
            ident = (str(self.path), None, None)
        if ident not in _WARNED:
            _WARNED.add(ident)
            warnings.warn(f"dispatch cache {self.path} ignored ({why}); decisions are measured again and the "
                          "file rewritten", DispatchCacheWarning, stacklevel=4)

    def load(self) -> dict[str, dict]:
        """All entries; {} when the file is missing, and (one warning) when it is unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (put says if it cannot be)
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            self._warn_once(f"{type(exc).__name__}: {exc}")
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            self._warn_once(f"not valid JSON: {exc}")
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
                or not isinstance(data.get("entries"), dict):
            self._warn_once(f"not a version-{CACHE_VERSION} dispatch cache")
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    def get(self, key: DispatchKey) -> dict | None:
        """The stored entry of ``key``, or None (absent, or malformed: measured again)."""
        entry = self.load().get(key.as_str())
        if entry is None or entry.get("key") != asdict(key) or not isinstance(entry.get("winner"), str):
            return None
        return entry

    def put(self, key: DispatchKey, choice: "Choice") -> None:
        """Store ``choice`` under ``key``; a file that cannot be written gives a warning, not an error."""
        from ..outputs import OutputError, write_json

        entries = self.load()
        entries[key.as_str()] = {**choice.to_dict(), "key": asdict(key),
                                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            write_json(self.path, {"version": CACHE_VERSION, "entries": entries})
        except OutputError as exc:  # a read-only home must not stop a run
            warnings.warn(f"dispatch cache not saved: {exc}", DispatchCacheWarning, stacklevel=3)


# ---- choosing --------------------------------------------------------------------------------------


@dataclass
class Choice:
    """The decision for one key.

    Attributes:
        winner: the provider to run.
        ms: per measured candidate, median milliseconds of one call on the slice.
        error: per candidate that returned, max |output - reference| (finite entries).
        excluded: per candidate not eligible, why (raised, error over the bound, wrong shape).
        tolerance: the bound the errors were held to.
        mode: ``"measure"`` or ``"static"``.
        from_cache: the decision was read from the cache (nothing ran).
    """

    winner: str
    ms: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    tolerance: float | None = None
    mode: str = "measure"
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("from_cache")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, from_cache: bool = False) -> "Choice":
        return cls(winner=str(d["winner"]), ms={str(k): float(v) for k, v in (d.get("ms") or {}).items()},
                   error={str(k): math.inf if v is None else float(v)  # JSON keeps inf as null
                          for k, v in (d.get("error") or {}).items()},
                   excluded={str(k): str(v) for k, v in (d.get("excluded") or {}).items()},
                   tolerance=None if d.get("tolerance") is None else float(d["tolerance"]),
                   mode=str(d.get("mode", "measure")), from_cache=from_cache)


def max_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max |out - reference| over the reference's finite entries, in float64; inf when the shapes or
    the positions of non-finite entries (e.g. the -inf self entries) differ, or an entry is NaN."""
    if tuple(out.shape) != tuple(reference.shape):
        return math.inf
    got, want = out.detach().double(), reference.detach().to(out.device, torch.float64)
    finite = torch.isfinite(want)
    if not all(torch.equal(f(got), f(want)) for f in (torch.isnan, torch.isposinf, torch.isneginf)):
        return math.inf
    if not finite.any():
        return 0.0
    err = (got[finite] - want[finite]).abs().max().item()
    return err if err == err else math.inf  # NaN -> inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _static(candidates: Mapping[str, Callable], static_choice: Sequence[str] | None) -> Choice:
    order = [n for n in (static_choice or ()) if n in candidates]
    return Choice(winner=order[0] if order else next(iter(candidates)), mode="static")


def measure(candidates: Mapping[str, Callable[[], torch.Tensor]], reference: torch.Tensor, tolerance: float,
            *, repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> Choice:
    """Run every candidate: ``warmup`` calls (the first one's output is checked against ``reference``),
    then ``repeats`` timed calls (synchronised on CUDA); the fastest median among those within
    ``tolerance`` wins, ties to the earlier candidate. Raises ``NoCorrectProviderError`` if none is."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got {warmup} and {repeats}")
    device = reference.device
    choice = Choice(winner="", tolerance=float(tolerance))
    for name, fn in candidates.items():
        try:
            out = fn()
            _sync(device)
            err = max_error(out, reference)
            choice.error[name] = err
            if not err <= tolerance:
                why = "wrong shape" if tuple(out.shape) != tuple(reference.shape) else \
                    f"max error {err:.3g} > {tolerance:.3g}"
                choice.excluded[name] = why
                continue
            for _ in range(warmup - 1):
                fn()
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = clock()
                fn()
                _sync(device)
                times.append(clock() - t0)
        except Exception as exc:  # any failure of a provider just means "not this one"
            choice.excluded[name] = f"raised {type(exc).__name__}: {exc}"[:300]
            continue
        choice.ms[name] = statistics.median(times) * 1e3
    if not choice.ms:
        reasons = "; ".join(f"{k}: {v}" for k, v in choice.excluded.items())
        raise NoCorrectProviderError(f"no candidate met the error bound {tolerance:.3g}: {reasons}")
    choice.winner = min(choice.ms, key=choice.ms.get)  # min keeps the first of equal times
    return choice


def _decide(key, candidates, reference, tolerance, cache, repeats, warmup, clock, force) -> Choice:
    if not force:
        entry = cache.get(key)
        if entry is not None and entry["winner"] in candidates:
            return Choice.from_dict(entry, from_cache=True)
    if len(candidates) == 1:  # nothing to compare: no run, nothing stored
        return Choice(winner=next(iter(candidates)), tolerance=float(tolerance))
    choice = measure(candidates, reference, tolerance, repeats=repeats, warmup=warmup, clock=clock)
    cache.put(key, choice)
    return choice


def _broadcast_from_rank0(payload: Any) -> Any:
    from .. import distributed

    helper = getattr(distributed, "broadcast_object", None)
    if helper is not None:
        return helper(payload, src=0)
    box = [payload]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size(), d.get_rank()
    return 1, 0


def choose(key: DispatchKey, candidates: Mapping[str, Callable[[], torch.Tensor]], reference: torch.Tensor,
           tolerance: float, *, cache: DispatchCache | None = None, repeats: int = 5, warmup: int = 1,
           static_choice: Sequence[str] | None = None, mode: str | None = None, force: bool = False,
           clock: Callable[[], float] = time.perf_counter) -> Choice:
    """The provider to run for ``key``.

    Args:
        key: what the decision depends on (``DispatchKey.for_pass``).
        candidates: provider name -> a call running the pass on the slice, returning its output
            (e.g. sim [n, L, n] float32); the order is the tie-break (and the static default).
        reference: the output the candidates must match (e.g. float64 on the same slice and device).
        tolerance: max |output - reference| allowed (``SIMILARITY_ERROR_BOUND[precision]``).
        cache: where decisions are kept; default ``DispatchCache()`` (the user's cache folder).
        repeats, warmup: timed calls per candidate, and untimed ones before them (>= 1: the first is
            the one checked against the reference).
        static_choice: preference order used when measuring is off.
        mode: ``"measure"`` or ``"static"``; default from ``MUSC_FAST_DISPATCH`` and the device.
        force: measure even when the key is cached (``musc-fast tune --force``).
        clock: seconds, for the timings (tests pass a fake one).
    Returns:
        ``Choice``: the winner, per-candidate ms and errors, the excluded ones with their reasons,
        whether it came from the cache. Collective under torch.distributed (module doc).
    Raises:
        NoCorrectProviderError: every candidate raised or missed the bound (on every rank).
    """
    if not candidates:
        raise ValueError(f"no candidate providers for {key.pass_kind}")
    mode = mode or dispatch_mode(reference.device)
    if mode not in ("measure", "static"):
        raise ValueError(f"dispatch mode must be measure or static, got {mode!r}")
    if mode == "static":  # deterministic, so every rank agrees without talking
        return _static(candidates, static_choice)
    world, rank = _world()
    if world == 1:
        return _decide(key, candidates, reference, tolerance, cache or DispatchCache(), repeats, warmup,
                       clock, force)
    payload: Any = None
    failure: Exception | None = None
    if rank == 0:
        try:
            choice = _decide(key, candidates, reference, tolerance, cache or DispatchCache(), repeats, warmup,
                             clock, force)
            payload = ("ok", choice.to_dict(), choice.from_cache)
        except Exception as exc:  # tell the other ranks, or they would wait forever
            failure, payload = exc, ("error", f"{type(exc).__name__}: {exc}", False)
    payload = _broadcast_from_rank0(payload)
    if failure is not None:
        raise failure
    if payload[0] == "error":
        raise NoCorrectProviderError(f"rank 0 could not choose a provider for {key.pass_kind}: {payload[1]}")
    return Choice.from_dict(payload[1], from_cache=payload[2])
