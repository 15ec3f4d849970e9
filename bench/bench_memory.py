"""Peak memory (RSS) of score_features vs N, one fresh subprocess per N, random tokens.

Default shape: ViT-B-16 at 224 px (L = 196, C = 768), 4 layers, r = 1, 3, 5, fp32 tokens on the CPU.
Each child builds the tokens, runs ``score_features`` (LNAMD, MSM, maps; no RsCIN), and reports
``ru_maxrss`` (the kernel's high-water mark of the whole process: torch's allocations included, which
tracemalloc would miss), the seconds it took, the memory plan, and the plan's own prediction.

    python bench/bench_memory.py --quick                   # N = 20, 50: a minute on a laptop CPU
    python bench/bench_memory.py --n 100 200 500           # the CPU target: N = 500 under 8 GB
    python bench/bench_memory.py --n 500 --budget 1G       # force the streaming plan
    python bench/bench_memory.py --n 200 --device cuda --length 1369 --channels 1024 --token-dtype fp16

Prints a table; ``--csv PATH`` also writes the rows (with environment columns when bench/harness.py
is present).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """Run one N and print one JSON line."""
    import torch

    from musc_fast import score_features
    from musc_fast.memory import available_bytes, estimate_peak_bytes, plan_scoring

    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.token_dtype]
    torch.manual_seed(0)
    torch.ones(1) @ torch.ones(1, 1)  # load the BLAS before the baseline reading
    base_mb = _rss_mb()
    n, length, c = args.child, args.length, args.channels
    proto = torch.randn(1, length, c)
    tokens = [(proto + 0.7 * torch.randn(n, length, c)).to(dev, dtype) for _ in range(args.layers)]
    r_list = tuple(args.r_list)
    plan = plan_scoring(n, length, c, n_r=len(r_list), device=dev)
    side = args.image_size
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = score_features(tokens, None, image_size=side, r_list=r_list, device=dev, memory=plan)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    predicted = estimate_peak_bytes(n, length, c, n_layers=args.layers, n_r=len(r_list),
                                    token_bytes=torch.empty((), dtype=dtype).element_size(), plan=plan)
    row = {
        "n": n, "length": length, "channels": c, "layers": args.layers, "r_list": " ".join(map(str, r_list)),
        "image_size": side, "device": str(dev), "token_dtype": args.token_dtype,
        "peak_rss_mb": round(_rss_mb(), 1), "baseline_rss_mb": round(base_mb, 1),
        "predicted_mb": round(predicted / 2**20, 1), "seconds": round(seconds, 2),
        "maps_mb": round(res.anomaly_maps.nbytes / 2**20, 1), "plan": plan.describe(),
        "free_mb_at_start": round(available_bytes(dev) / 2**20),
    }
    if dev.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    print(json.dumps(row))


def run_one(n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--length", str(args.length),
           "--channels", str(args.channels), "--layers", str(args.layers), "--image-size",
           str(args.image_size), "--device", args.device, "--token-dtype", args.token_dtype,
           "--r-list", *map(str, args.r_list)]
    env = dict(os.environ)
    if args.budget:
        env["MUSC_FAST_MEMORY_BUDGET"] = args.budget
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise SystemExit(f"N={n} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100, 200, 500])
    p.add_argument("--quick", action="store_true", help="N = 20, 50 only")
    p.add_argument("--length", type=int, default=196)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--r-list", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--token-dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--budget", default=None, help="MUSC_FAST_MEMORY_BUDGET for the children, e.g. 1G")
    p.add_argument("--csv", default=None, help="also write the rows here")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args)
        return 0
    ns = [20, 50] if args.quick else args.n
    rows = []
    cols = ["n", "peak_rss_mb", "predicted_mb", "baseline_rss_mb", "seconds", "plan"]
    print("  ".join(f"{c:>14}" if c != "plan" else c for c in cols))
    for n in ns:
        row = run_one(n, args)
        rows.append(row)
        print("  ".join(f"{row[c]!s:>14}" if c != "plan" else str(row[c]) for c in cols), flush=True)
    if args.csv:
        _write_csv(rows, Path(args.csv))
    return 0


def _write_csv(rows: list[dict], path: Path) -> None:
    try:
        from bench.harness import write_rows
    except ImportError:  # the shared harness is not on this branch yet: plain CSV
        import csv

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return
    write_rows(rows, path)


if __name__ == "__main__":
    sys.exit(main())
