"""Memory-bounded scoring: chunk sizes chosen from free memory (this module only plans; the MSM passes
that honour the plans are run by ``musc_fast.engine``).

The big buffer of one (r, layer) MSM pass is the nearest-similarity table ``sim [N, L, N]`` float32
(N = 1000, L = 1369: 5.5 GB). Two ways to fill it, picked per run by ``plan_scoring``:

* **full** (default whenever it fits): the whole table, each unordered image pair computed once (one
  product block gives both directions). FLOPs N^2 L^2 C per pass; memory N L N floats.
* **streaming** (when the table does not fit): query images in row groups of b; each group is
  multiplied against all N images and only its row maxima are kept, ``[b, L, N]``, reduced at once to
  the interval mean and freed. Memory O(b L N); FLOPs 2 N^2 L^2 C (no symmetry). Keeping the symmetric
  trick while streaming would need the column maxima of every block for the rows of later groups,
  i.e. the lower triangle of the table (N^2 L / 2 floats at the worst point): it saves at most half
  the memory for the same FLOPs, so the streaming mode pays the 2x FLOPs and gets O(b L N) instead.
  Keeping per patch only what the interval mean needs (the k_max = 0.3 (N-1) largest similarities)
  would be 0.3 of the table: not worth a heap per patch.

Other knobs: ``block_elems`` (one product block, default 64 Mi floats), ``rows_per_chunk`` (rows per
top-k in the interval mean), ``map_chunk`` (images per upsampling chunk), and LNAMD: all r at once
(``lnamd_all_r``) or one r at a time (LayerNorm recomputed per r), over all images or over chunks of
``lnamd_chunk`` images written into one preallocated Z (LNAMD is per image). Only ``block_elems``
and ``lnamd_chunk`` can change results, and only in the last float32 bit (matmul blocking, batched
reductions); the plan keeps the defaults unless memory is short (``block_elems`` below a ~3 GiB
budget). Distributed runs agree on one plan, so their results stay bit-identical.

Expected peaks (z = N L C 4 bytes of one Z, z_img = L C 4; tokens resident; "fixed" = one product
block + the top-k temporaries of one row chunk; the LNAMD phase and the MSM phase do not overlap):

    all r at once:           tokens + max((n_r + 3) z, n_r z + sim + fixed)
    one r at a time:         tokens + max(4 z, z + sim + fixed)
    LNAMD in chunks of k:    tokens + max(z + 4 k z_img, z + sim + fixed)
    streaming b rows:        ... with sim replaced by b L N 4

``estimate_peak_bytes`` is this model (tested); it excludes the interpreter, torch's own footprint
and allocator slack.

When CUDA runs out of memory anyway (other processes, fragmentation), ``OomRetry`` repeats the failed
step with ``MemoryPlan.degraded()``: smaller product blocks first, then one r at a time, streaming rows,
LNAMD chunks (a MemoryWarning each time; not under several torch.distributed ranks, which must agree
on the blocks). A CPU allocation failure is not retried: Linux kills the process rather than raising,
so CPU runs rely on the plan fitting ``available_bytes`` up front.

* Paper config on one GPU, N = 1000, divide_num = 1 (ViT-L-14-336, 518 px: L = 1369, C = 1024, fp16
  tokens, 4 layers, r = 1, 3, 5): tokens 11.2 GB, z 5.6 GB, sim 5.5 GB, fixed 0.9 GB.
  All r at once: 11.2 + max(33.6, 23.2) = 44.9 GB (the plan on an 80 GB or 141 GB card: full table,
  no streaming); one r at a time: 33.6 GB; LNAMD in chunks of 64: 23.2 GB; plus streaming 100 rows:
  18.3 GB. On the GPU the Triton LNAMD/MSM kernels may run under any plan (``musc_fast.engine``); their
  temporaries are not in this model.
* CPU, N = 500, ViT-B-16 at 224 px (L = 196, C = 768, fp32 tokens, 4 layers, r = 1, 3, 5): tokens
  1.2 GB, z 0.30 GB, sim 0.20 GB: 1.2 + max(1.8, 1.3) = 3.0 GB, plus the interpreter and torch
  (about 0.5 GB) and the maps; ``bench/bench_memory.py`` measures it (N = 100: 1.15 GB peak RSS
  measured for 0.60 GB predicted + 0.51 GB baseline).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .ops.interval import interval_bounds
from .ops.msm import DEFAULT_BLOCK_ELEMS

ENV_BUDGET = "MUSC_FAST_MEMORY_BUDGET"  # bytes, or with a K/M/G/T suffix: overrides the free-memory probe
DEFAULT_SAFETY = 0.5  # plan for this fraction of the free memory (allocator slack, other processes)
DEFAULT_ROWS = 64
DEFAULT_MAP_CHUNK = 16
SHIFT_ROWS = 4  # query images per row group of the aligned-window shift path (the engine shards these)
_TOPK_BYTES = 28  # per kept entry: fp32 value + int64 index + the float64 slice + float64 distance
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"8G"``, ``"512M"``, ``"1.5G"`` or a plain byte count -> bytes."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1] if s and s[-1] in _UNITS else ""
    try:
        value = float(s[:-1] if unit else s)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size (examples: 8G, 512M, 1073741824)") from None
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """Bytes left under a container's memory limit (cgroup v2 or v1), None when unlimited or unknown."""
    pairs = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]
    for limit_path, usage_path in pairs:
        try:
            limit = Path(limit_path).read_text().strip()
            usage = int(Path(usage_path).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 reports "unlimited" as a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device`` in bytes (``MUSC_FAST_MEMORY_BUDGET`` overrides the probe).

    CUDA: ``torch.cuda.mem_get_info`` plus what torch's caching allocator holds but does not use.
    CPU: /proc/meminfo MemAvailable, capped by a cgroup limit; ``os.sysconf`` as a fallback.
    """
    env = os.environ.get(ENV_BUDGET)
    if env:
        return parse_bytes(env)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + max(0, cached))
    found = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    if not found:
        try:
            found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            found = [8 << 30]  # nothing to ask: assume a modest machine
    return int(min(found))


class MemoryWarning(UserWarning):
    """The planned working set does not fit the memory budget even in the leanest mode."""


@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes for the MSM passes of one ``score_features`` call.

    Attributes:
        block_elems: float32 elements of one product block (the only knob that can move a last bit).
        rows_per_chunk: rows of ``sim`` per top-k in the interval mean.
        map_chunk: images per chunk when upsampling maps.
        stream_rows: None = fill the whole ``[N, L, N]`` table (symmetric, fewest FLOPs); b = stream
            query row groups of b images (``[b, L, N]`` alive, twice the FLOPs).
        lnamd_all_r: LNAMD makes every r from one LayerNorm (faster) or one r at a time (less memory).
        lnamd_chunk: None = LNAMD of all images at once; k = k images at a time into a preallocated Z
            (temporaries of k images instead of N).
        budget_bytes: the budget this plan was made for (None: not planned, defaults).
    """

    block_elems: int = DEFAULT_BLOCK_ELEMS
    rows_per_chunk: int = DEFAULT_ROWS
    map_chunk: int = DEFAULT_MAP_CHUNK
    stream_rows: int | None = None
    lnamd_all_r: bool = True
    lnamd_chunk: int | None = None
    budget_bytes: int | None = None

    @property
    def is_default(self) -> bool:
        """True when the plan is the library defaults (informational: the engine's planner picks the
        provider the same way under every plan)."""
        return replace(self, budget_bytes=None) == MemoryPlan()

    def degraded(self, n: int, length: int) -> "MemoryPlan | None":
        """The next, leaner plan after an out-of-memory error, or None when nothing is left to shrink.

        Order (cheapest loss of speed first): halve ``block_elems`` down to one image pair (L * L); LNAMD
        one r at a time (this also leaves the one-Gram path); stream query rows (N / 2, then halving);
        LNAMD over image chunks (N / 2, then halving); halve the top-k row chunk.
        """
        floor = length * length
        if self.block_elems > floor:
            return replace(self, block_elems=max(floor, self.block_elems // 2))
        if self.lnamd_all_r:
            return replace(self, lnamd_all_r=False)
        rows = n if self.stream_rows is None else self.stream_rows
        if rows > 1:
            return replace(self, stream_rows=rows // 2)
        chunk = n if self.lnamd_chunk is None else self.lnamd_chunk
        if chunk > 1:
            return replace(self, lnamd_chunk=chunk // 2)
        if self.rows_per_chunk > 1:
            return replace(self, rows_per_chunk=self.rows_per_chunk // 2)
        return None

    def describe(self) -> str:
        mode = "full table" if self.stream_rows is None else f"streaming {self.stream_rows} rows"
        budget = "unplanned" if self.budget_bytes is None else f"budget {_fmt(self.budget_bytes)}"
        lnamd = "all images" if self.lnamd_chunk is None else f"{self.lnamd_chunk} images"
        return (f"{mode}, block {self.block_elems} elems, {self.rows_per_chunk} rows/top-k, "
                f"LNAMD {'all r' if self.lnamd_all_r else 'one r'} x {lnamd} at a time, {budget}")


def _fmt(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def _k_max(n_others: int, topmin: tuple[float, float]) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return max(1, interval_bounds(max(1, n_others), topmin)[1])


def _fixed_bytes(block_elems: int, rows: int, length: int, k_max: int, n: int) -> int:
    # product block (at most 4 query images x N partners) + its windowed copy + the maxima; top-k
    # temporaries of one row chunk
    block = min(block_elems, 4 * n * length * length)
    return 3 * 4 * block + rows * length * k_max * _TOPK_BYTES


def budget_for(device: torch.device | str, budget: int | None = None, safety: float = DEFAULT_SAFETY) -> int:
    """The bytes a plan may use: ``budget`` if given, else ``safety`` x the free memory of ``device``."""
    if budget is not None:
        return int(budget)
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    return int(safety * available_bytes(device))


def plan_scoring(n: int, length: int, c: int, *, n_r: int, topmin: tuple[float, float] = (0.0, 0.3),
                 device: torch.device | str = "cpu", budget: int | None = None,
                 safety: float = DEFAULT_SAFETY) -> MemoryPlan:
    """Choose chunk sizes for scoring N images of L patches x C channels with ``n_r`` degrees per layer.

    Order of preference (fastest first): full table with all r at once; full table with one r at a
    time; LNAMD over image chunks (one Z plus a chunk's temporaries alive); streaming row groups as
    large as the budget allows (at least one image). See the module docstring for the model.

    Args:
        budget: bytes the working set may use; default ``safety`` x the free memory of ``device``
            (measured now, so resident tokens are already accounted for).
    """
    budget = budget_for(device, budget, safety)
    z_img = length * c * 4
    z = n * z_img
    sim = n * length * n * 4
    k_max = _k_max(n - 1, topmin)
    block = DEFAULT_BLOCK_ELEMS
    if budget < 32 * 4 * DEFAULT_BLOCK_ELEMS:  # under 8 GiB of budget: smaller product blocks
        block = max(length * length, min(DEFAULT_BLOCK_ELEMS, budget // (16 * 4 * 3)))
    rows = max(1, min(DEFAULT_ROWS, budget // (8 * length * k_max * _TOPK_BYTES)))
    fixed = _fixed_bytes(block, rows, length, k_max, n)
    base = MemoryPlan(block_elems=block, rows_per_chunk=rows, budget_bytes=budget)
    if max((n_r + 3) * z, n_r * z + sim + fixed) <= budget:
        return base
    if max(4 * z, z + sim + fixed) <= budget:
        return replace(base, lnamd_all_r=False)
    # LNAMD in image chunks: the Z being made plus 4 chunk-sized temporaries
    chunk = int(max(1, min(n, (budget - z) // (4 * z_img))))
    per_row = length * n * 4
    if z + max(4 * z_img, per_row + fixed) > budget:
        import warnings

        warnings.warn(f"the memory budget ({_fmt(budget)}) is below the floor of this set (one Z of "
                      f"{_fmt(z)} + one streamed row of {_fmt(per_row + fixed)} for N={n}); scoring may "
                      f"run out of memory", MemoryWarning, stacklevel=2)
    b = int(max(1, min(n, (budget - z - fixed) // per_row)))
    return replace(base, lnamd_all_r=False, lnamd_chunk=None if chunk >= n else chunk,
                   stream_rows=None if b >= n else b)


# CUDA's allocator failure; older torch only has the torch.cuda name.
OUT_OF_MEMORY: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class PlanChanged(Exception):
    """Raised by ``OomRetry.call`` when the leaner plan no longer suits the caller's path (the caller
    switches to another path, e.g. from the one-Gram path to per-r passes)."""


class OomRetry:
    """Runs scoring steps under a plan that shrinks after each out-of-memory error, then retries.

    Each step must be atomic (its result used only when it returns), so a retry repeats exactly the
    work that failed. The shrunken plan is kept for the later steps. Under torch.distributed with
    several ranks there is no retry (ranks must agree on the blocks): the error propagates.

    Attributes:
        plan: the current plan. retries: how many out-of-memory errors were survived.
    """

    def __init__(self, plan: MemoryPlan, n: int, length: int, device: torch.device | str = "cpu"):
        self.plan, self.n, self.length = plan, n, length
        self.device = torch.device(device)
        self.retries = 0

    def call(self, fn, still_ok=None):
        """``fn(plan)``, retried with ``plan.degraded()`` after each OUT_OF_MEMORY.

        Args:
            still_ok: optional predicate on a new plan; when it fails, ``PlanChanged`` is raised instead
                of retrying ``fn`` (the caller falls back to another path under ``self.plan``).
        """
        import warnings

        from . import distributed

        while True:
            try:
                return fn(self.plan)
            except OUT_OF_MEMORY as exc:
                leaner = None if distributed.world_size() > 1 else self.plan.degraded(self.n, self.length)
                if leaner is None:
                    raise
                reason = " ".join(str(exc).split())[:160] or "out of memory"
            # outside the except block, so the failed step's tensors are no longer referenced
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory while scoring ({reason}); retrying with {leaner.describe()}",
                          MemoryWarning, stacklevel=2)
            self.plan = leaner
            self.retries += 1
            if still_ok is not None and not still_ok(leaner):
                raise PlanChanged


def fits_one_gram(plan: MemoryPlan, n: int, length: int, c: int, n_r: int) -> bool:
    """Whether the one-Gram path (``ops/boxgram.py``: every r of a layer from one product block) fits
    the plan: it keeps the LayerNorm'd tokens, the ``[n_r, N, L, N]`` tables of all r at once and a
    few block-sized temporaries per r, and it has no streaming mode."""
    if plan.stream_rows is not None or not plan.lnamd_all_r:
        return False
    if plan.budget_bytes is None:
        return True
    need = n * length * c * 4 + n_r * n * length * n * 4 + 4 * 4 * min(plan.block_elems, n * length * length)
    return need <= plan.budget_bytes


def estimate_peak_bytes(n: int, length: int, c: int, *, n_layers: int, n_r: int, token_bytes: int,
                        plan: MemoryPlan, topmin: tuple[float, float] = (0.0, 0.3)) -> int:
    """The model behind ``plan_scoring``: expected peak bytes of tokens + LNAMD + MSM (no backbone,
    no interpreter, no allocator slack)."""
    z_img = length * c * 4
    z = n * z_img
    rows_n = n if plan.stream_rows is None else plan.stream_rows
    sim = rows_n * length * n * 4
    fixed = _fixed_bytes(plan.block_elems, plan.rows_per_chunk, length, _k_max(n - 1, topmin), n)
    tokens = n_layers * n * length * c * token_bytes
    kept = n_r if plan.lnamd_all_r else 1
    lnamd = (kept + 3) * z if plan.lnamd_chunk is None else z + 4 * plan.lnamd_chunk * z_img
    return tokens + max(lnamd, kept * z + sim + fixed)


class InsufficientMemoryError(ValueError):
    """A run whose smallest working set cannot fit the free memory: refused before the backbone runs."""


def estimate_run_floor(n: int, image_size: int, grid: int, channels: tuple[int, ...] | list[int], *,
                       token_bytes: int, n_score: int | None = None,
                       topmin: tuple[float, float] = (0.0, 0.3)) -> tuple[int, int]:
    """The least memory scoring N images at S x S can take, split by where it lives:
    (host bytes, compute-device bytes). On the CPU both are the same memory.

    Host: the preprocessed pixels [N, 3, S, S] float32 (alive while scoring) + the anomaly maps
    [N, S, S] float32 + the masks [N, S, S] bool. Device: the tokens of every layer (``token_bytes``
    each) + the leanest scoring plan (one Z of the widest layer, one streamed row [1, L, n], the smallest
    product block and one top-k row): ``plan_scoring`` cannot go below this. ``n_score``: images
    scored together (``divide_num`` subsets), default N. Excludes the backbone's own activations,
    weights and the interpreter, so the true peak is higher.
    """
    n_sub = n if n_score is None else n_score
    length = grid * grid
    pixels = n * 3 * image_size * image_size * 4
    maps = n * image_size * image_size * (4 + 1)
    tokens = sum(n * length * c * token_bytes for c in channels)
    z = n_sub * length * max(channels) * 4
    row = length * n_sub * 4
    fixed = _fixed_bytes(length * length, 1, length, _k_max(n_sub - 1, topmin), n_sub)
    return pixels + maps, tokens + z + row + fixed


def check_run_fits(n: int, image_size: int, grid: int, channels: tuple[int, ...] | list[int], *,
                   token_bytes: int, device: torch.device | str = "cpu", n_score: int | None = None,
                   topmin: tuple[float, float] = (0.0, 0.3), what: str = "") -> None:
    """Raise ``InsufficientMemoryError`` (one line naming the estimate) when ``estimate_run_floor`` exceeds
    the free memory (``available_bytes``: host RAM, and the GPU's for a CUDA device)."""
    host, dev_bytes = estimate_run_floor(n, image_size, grid, channels, token_bytes=token_bytes,
                                         n_score=n_score, topmin=topmin)
    dev = torch.device(device)
    label = f"{what}: " if what else ""
    hint = "use a smaller --image-size, or --divide-num to score fewer images together"
    if dev.type == "cuda":
        free_dev = available_bytes(dev)
        if dev_bytes > free_dev:
            raise InsufficientMemoryError(
                f"{label}scoring {n} images at {image_size} px needs at least {_fmt(dev_bytes)} on {dev} "
                f"(tokens + the leanest scoring plan) but {_fmt(free_dev)} is free; {hint}")
        need, where = host, "host memory"
    else:
        need, where = host + dev_bytes, "memory"
    free = available_bytes("cpu")
    if need > free:
        raise InsufficientMemoryError(
            f"{label}scoring {n} images at {image_size} px needs at least {_fmt(need)} of {where} (pixels, "
            f"tokens, maps and the leanest scoring plan) but {_fmt(free)} is available; {hint}")


def lnamd_planned(tokens: torch.Tensor, r_list: list[int], plan: MemoryPlan) -> list[torch.Tensor]:
    """``ops.lnamd_multi`` under the plan: all images at once, or image chunks written into one
    preallocated Z per r (LNAMD is per image: the same values up to float32 rounding of batched
    reductions, about 1 ulp).

    Args:
        tokens: [N, L, C]. Returns: one [N, L, C] float32 per r.
    """
    from . import ops

    n = tokens.shape[0]
    if plan.lnamd_chunk is None or plan.lnamd_chunk >= n:
        return ops.lnamd_multi(tokens, r_list)
    out = [torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device) for _ in r_list]
    for s in range(0, n, plan.lnamd_chunk):
        for dst, z in zip(out, ops.lnamd_multi(tokens[s:s + plan.lnamd_chunk], r_list)):
            dst[s:s + plan.lnamd_chunk] = z
    return out


def row_groups(n: int, rows: int) -> list[tuple[int, int]]:
    """[i0, i1) query row groups of the streaming mode."""
    return [(i0, min(n, i0 + rows)) for i0 in range(0, n, max(1, rows))]


@dataclass(frozen=True)
class BankPlan:
    """Chunk sizes for scoring B new images against a bank of M images.

    Attributes:
        query_block: new images scored together (their ``[q, L, M]`` tables for every r are alive).
        bank_chunk: bank images whose Z (all r) are made at once when they are not cached.
        cache_z: keep the bank's Z for every (layer, r) on the device between calls.
        block_elems, rows_per_chunk, map_chunk: as in ``MemoryPlan``.
    """

    query_block: int
    bank_chunk: int
    cache_z: bool
    block_elems: int = DEFAULT_BLOCK_ELEMS
    rows_per_chunk: int = DEFAULT_ROWS
    map_chunk: int = DEFAULT_MAP_CHUNK
    budget_bytes: int | None = None


def plan_bank(n_query: int, n_bank: int, length: int, c: int, *, n_layers: int, n_r: int,
              z_bytes: int = 4, topmin: tuple[float, float] = (0.0, 0.3),
              device: torch.device | str = "cpu", budget: int | None = None,
              safety: float = DEFAULT_SAFETY) -> BankPlan:
    """Chunk sizes for bank scoring. The Z cache (``n_layers * n_r * M * L * C * z_bytes``) is used when
    it takes at most half the budget; the rest goes to the query tables and a bank chunk's LNAMD."""
    budget = budget_for(device, budget, safety)
    per_image_z = length * c * 4
    cache_bytes = n_layers * n_r * n_bank * length * c * z_bytes
    cache = cache_bytes <= budget // 2
    left = budget - (cache_bytes if cache else 0)
    k_max = _k_max(n_bank, topmin)
    block = DEFAULT_BLOCK_ELEMS if left >= 32 * 4 * DEFAULT_BLOCK_ELEMS else \
        max(length * length, min(DEFAULT_BLOCK_ELEMS, left // (16 * 4 * 3)))
    rows = max(1, min(DEFAULT_ROWS, left // (8 * length * k_max * _TOPK_BYTES)))
    left -= _fixed_bytes(block, rows, length, k_max, n_bank)
    chunk = n_bank if cache else max(1, min(n_bank, (left // 4) // ((n_r + 3) * per_image_z)))
    per_query = n_r * length * n_bank * 4 + (n_r + 3) * per_image_z
    query = max(1, min(n_query, (left // 2) // per_query))
    return BankPlan(query_block=int(query), bank_chunk=int(chunk), cache_z=cache, block_elems=block,
                    rows_per_chunk=rows, budget_bytes=budget)


__all__ = [
    "ENV_BUDGET", "MemoryPlan", "MemoryWarning", "BankPlan", "available_bytes", "parse_bytes", "budget_for",
    "plan_scoring", "plan_bank", "estimate_peak_bytes", "row_groups", "lnamd_planned", "fits_one_gram",
    "OUT_OF_MEMORY", "OomRetry", "PlanChanged",
    "InsufficientMemoryError", "estimate_run_floor", "check_run_fits",
]
