"""Shared benchmark harness: timing quantiles, environment facts, CSV rows, a text table.

Scripts import it as ``from bench.harness import measure, env_info, write_rows, print_table``; they run
as ``python -m bench.<script>`` from the repo root, or as ``python bench/<script>.py`` when they put the
repo root on ``sys.path`` first (see bench/bench_metrics.py).
"""
from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def measure(fn, *, warmup: int = 1, reps: int = 5, sync=None, do_bench: bool = False) -> dict:
    """Time ``fn()``; returns {"ms_p20", "ms_p50", "ms_p80", "ms_first", "reps", "timer"}.

    sync: None (CPU work, nothing to wait for), "cuda" (torch.cuda.synchronize around each call) or a
    callable. ``ms_first`` is the first warm-up call alone (compile/caching cost shows up there).
    do_bench: on a CUDA machine with Triton, let ``triton.testing.do_bench`` take the quantiles (it
    flushes L2 and times with CUDA events; its warmup/rep budgets are in ms: 25/100). Falls back to the
    wall-clock loop elsewhere.
    """
    wait = _cuda_sync if sync == "cuda" else (sync or (lambda: None))
    first = float("nan")
    for i in range(max(warmup, 0)):
        t0 = time.perf_counter()
        fn()
        wait()
        if i == 0:
            first = (time.perf_counter() - t0) * 1e3
    if do_bench:
        try:
            import torch
            import triton.testing

            if torch.cuda.is_available():
                p20, p50, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
                return {"ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "ms_first": first,
                        "reps": float("nan"), "timer": "triton.do_bench"}
        except ImportError:
            pass
    times = []
    for _ in range(max(reps, 1)):
        wait()
        t0 = time.perf_counter()
        fn()
        wait()
        times.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    return {"ms_p20": float(p20), "ms_p50": float(p50), "ms_p80": float(p80), "ms_first": first,
            "reps": len(times), "timer": "perf_counter"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def env_info() -> dict:
    """Machine, CPU model and cores, GPU name (or ""), python/torch/numpy/triton versions, git sha, dirty."""
    info = {"machine": platform.machine(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except ImportError:
        info.update(torch="", threads="", gpu="")
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    info["git_sha"] = _git("rev-parse", "--short=12", "HEAD")
    info["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    info["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return info


def write_rows(rows: list[dict], csv_path, *, append: bool = True) -> Path:
    """Write ``rows`` (+ the env_info() columns on each) to ``csv_path``; keeps earlier rows if ``append``.

    Columns are the union of old and new keys, in first-seen order.
    """
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = env_info()
    new = [{**r, **env} for r in rows]
    old = []
    if append and path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys(k for r in old + new for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old + new)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_rows(rows: list[dict], columns=None) -> str:
    """Rows of dicts -> an aligned text table over ``columns`` (default: keys of the first row)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def print_table(rows: list[dict], columns=None, file=None) -> None:
    """Print format_rows(rows, columns) to ``file`` (stdout)."""
    print(format_rows(rows, columns), file=file or sys.stdout)


PROVIDER_COLUMNS = ["provider", "precision", "ms_p20", "ms_p50", "ms_p80", "ms_first"]


def report_providers(rows: list[dict], rate_column: str, bench: str, device: str, out: str | None) -> Path:
    """The common ending of the per-op benchmarks: speed-up against the "original" provider, a printed
    table, and the rows appended to ``out`` (default ``bench/results/<bench>_<device kind>.csv``)."""
    base = next((r["ms_p50"] for r in rows if r["provider"] == "original"), None)
    for r in rows:
        r["speedup"] = base / r["ms_p50"] if base else ""
    print_table(rows, [*PROVIDER_COLUMNS, rate_column, "speedup", "max_abs_diff"])
    out_path = Path(out) if out else REPO / "bench" / "results" / f"{bench}_{device.split(':')[0]}.csv"
    write_rows(rows, out_path)
    print(f"rows appended to {out_path}")
    return out_path

