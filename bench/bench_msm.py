"""Benchmark MSM (one (r, layer) pass, SPEC 3): the original's per-query loop against musc_fast's providers.

Providers:
  original  the original's algorithm (SPEC 3.1/3.2) in torch: per query image, torch.cat of all other
            images, torch.cdist against them, view (L, N-1, L), min over the last axis, topk smallest
            k_max, topk largest k_max - k_min of those, mean; rows concatenated in float64. fp32.
  torch     musc_fast.ops.mutual_scores with MUSC_FAST_MSM=torch (symmetric blocks, no distance matrix).
  faiss     MUSC_FAST_MSM=faiss: FAISS IndexFlatIP per image, k=1 (ordered pairs), then the interval mean.
  triton    MUSC_FAST_MSM=triton: the persistent mutual-min kernel + the interval-mean kernel. GPU only.
            Precision "tf32" (kernel-only) calls the kernels directly.

Reported per provider and precision: ms p20/p50/p80, TFLOP/s (2 L^2 C per unordered pair for ours, per
ordered pair for the original, i.e. the work each one actually does), the speed-up over the original
(p50 ratio) and the max abs difference of the scores from the original's. On a GPU the run also measures
the matmul roofline in the same process (torch.mm of a [8L, C] x [C, 8L] product in bf16, fp32 with
TF32 off, and TF32).

    python bench/bench_msm.py            # N=48, L=196, C=768 (CPU: original, torch, faiss)
    python bench/bench_msm.py --quick    # tiny smoke run
    python -m bench.bench_msm --paper --providers original,torch,triton --precision fp32,bf16,tf32
                                         # GPU, N=200 L=1369 C=1024

CPU numbers on a shared machine are noisy: don't commit them. Rows go to bench/results/ (``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.harness import PROVIDER_COLUMNS, REPO, measure, print_table, write_rows
from musc_fast.ops import interval_bounds, mutual_scores

PAPER = dict(n=200, length=1369, c=1024)  # ViT-L-14-336 at 518 px, 200 images per set (SPEC 9)


def original_scores(z: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """The original's MSM for one pass, as SPEC 3.1-3.2 describe it. z [N, L, C] fp32 -> [N, L] float64."""
    n, length, c = z.shape
    rows = []
    for i in range(n):
        z_ref = torch.cat([z[:i], z[i + 1:]], dim=0).reshape(-1, c)  # the (N-1) L C copy
        d = torch.cdist(z[i], z_ref)  # [L, (N-1) L] distance matrix
        a = d.view(length, n - 1, length).min(dim=-1).values  # [L, N-1] per-image nearest distances
        small = torch.topk(a, k_max, dim=-1, largest=False).values
        kept = torch.topk(small, k_max - k_min, dim=-1, largest=True).values
        rows.append(kept.mean(dim=-1).double())  # mean in fp32, widened after (golden quirk 1)
    return torch.stack(rows)


@contextlib.contextmanager
def msm_backend(name: str):
    old = os.environ.get("MUSC_FAST_MSM")
    os.environ["MUSC_FAST_MSM"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MUSC_FAST_MSM", None)
        else:
            os.environ["MUSC_FAST_MSM"] = old


def make_z(n: int, length: int, c: int, device: str, seed: int = 0) -> torch.Tensor:
    """[N, L, C] fp32 unit rows; patches of the same position are similar across images (aligned objects)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    proto = torch.randn(1, length, c, generator=g)
    z = torch.empty(n, length, c)
    for i in range(n):  # per image: bounded host memory at the paper shape
        z[i] = proto[0] + 0.6 * torch.randn(length, c, generator=g)
    z = z.to(device)
    return z / z.norm(dim=-1, keepdim=True)


def fma_precision() -> tuple[str | None, str]:
    """The precision name that runs the mutual-min kernel as IEEE fp32 FMA (no tensor cores), found at run
    time in the kernel module's own table, or (None, why). Before the exact tensor-core mode existed the
    plain "fp32" kernel was the FMA one; afterwards the FMA kernel has a name of its own."""
    from musc_fast.kernels import mutual_min as mm

    table = mm._PRECISIONS
    named = [k for k in table if "fma" in k.lower() or "ieee" in k.lower()]
    if named:
        return named[0], f"kernel precision {named[0]!r}"
    if table.get("fp32") == "ieee":
        return "fp32", "this kernel's fp32 is the IEEE FMA one (no separate exact tensor-core mode yet)"
    return None, f"no IEEE-FMA fp32 precision among {sorted(table)}"


def provider_fn(name: str, precision: str, z: torch.Tensor, topmin):
    k_min, k_max = interval_bounds(z.shape[0] - 1, topmin)
    if name == "original":
        return lambda: original_scores(z, k_min, k_max)
    if name in ("triton", "triton_fma"):  # the kernels themselves, whatever the gate would route to
        from musc_fast.kernels import mutual_scores_triton

        return lambda: mutual_scores_triton(z, k_min, k_max, precision=precision)

    def run():
        with msm_backend(name):
            return mutual_scores(z, topmin, precision=precision)

    return run


def timed(fn, reps: int, sync, single: bool = False) -> tuple[dict, object]:
    """measure() with the first call done here, so its output can be checked without an extra run; one more
    warm-up call unless the first took over a second (thread pools, allocator and caches settle).
    ``single``: that first call is the only one (kernels compiled beforehand by a small warm-up)."""
    t0 = time.perf_counter()
    out = fn()
    if sync == "cuda":
        torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    if single:
        return {"ms_p20": first, "ms_p50": first, "ms_p80": first, "ms_first": first, "reps": 1,
                "timer": "single call"}, out
    t = measure(fn, warmup=0 if first > 1000 else 1, reps=reps, sync=sync)
    t["ms_first"] = first
    return t, out


def roofline_rows(length: int, c: int, sync) -> list[dict]:
    """torch.mm TFLOP/s measured in this process (GPU only), at the per-pair shape [L, C] x [C, L] and at
    a larger block [8L, C] x [C, 8L], in bf16, fp16, fp32 (TF32 off) and TF32."""
    rows = []
    for m in (length, 8 * length):
        for label, dtype, tf32 in [("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                                   ("fp32", torch.float32, False), ("tf32", torch.float32, True)]:
            a = torch.randn(m, c, device="cuda", dtype=dtype)
            b = torch.randn(c, m, device="cuda", dtype=dtype)
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                t = measure(lambda a=a, b=b: a @ b, warmup=3, reps=20, sync=sync, do_bench=True)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            rows.append({"bench": "msm", "provider": "roofline_mm", "precision": label, "n": "", "length": m,
                         "c": c, **t, "tflops": 2 * m * m * c / (t["ms_p50"] * 1e-3) / 1e12,
                         "note": "per-pair shape" if m == length else "8L block"})
            del a, b
    return rows


PROVIDERS = ("original", "torch", "faiss", "triton", "triton_fma", "interval_mean")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--length", type=int, default=196)
    ap.add_argument("--c", type=int, default=768)
    ap.add_argument("--paper", action="store_true", help="N=200, L=1369, C=1024 (GPU; --n overrides N)")
    ap.add_argument("--quick", action="store_true", help="N=12, L=49, C=64, 2 reps: a smoke run")
    ap.add_argument("--providers", default="original,torch,faiss,triton",
                    help=f"comma list of {', '.join(PROVIDERS)}")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32,bf16,fp16,tf32 (tf32: triton)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per provider (default 5; paper 3)")
    ap.add_argument("--original-reps", type=int, default=None,
                    help="timed runs of the original (default: --reps)")
    ap.add_argument("--single", action="store_true",
                    help="one timed call per provider (large N), after a warm-up on 24 images that compiles")
    ap.add_argument("--roofline", action="store_true", help="torch.mm roofline rows (GPU; default with --paper)")
    ap.add_argument("--repeat-check", action="store_true",
                    help="triton rows: run the pass once more and record whether the scores are bitwise equal")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/bench_msm_<device>.csv)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and imports, run nothing")
    args = ap.parse_args(argv)

    n, length, c = args.n, args.length, args.c
    reps = args.reps
    if args.paper:
        n = n if "--n" in (argv or sys.argv) else PAPER["n"]
        length, c = PAPER["length"], PAPER["c"]
        reps = reps or 3
    if args.quick:
        n, length, c = 12, 49, 64
        reps = reps or 2
    reps = reps or 5
    original_reps = args.original_reps or reps
    device = args.device
    on_gpu = device.startswith("cuda")
    sync = "cuda" if on_gpu else None
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {', '.join(PROVIDERS)}")
    out_path = Path(args.out) if args.out else REPO / "bench" / "results" / f"bench_msm_{device.split(':')[0]}.csv"
    if args.dry_run:
        if any(p in providers for p in ("triton", "triton_fma", "interval_mean")):
            import musc_fast.kernels.interval_mean  # noqa: F401  (imports triton)
            import musc_fast.kernels.mutual_min  # noqa: F401
        print(f"dry run ok: N={n} L={length} C={c}, providers {providers}, precisions {precisions}, "
              f"out {out_path}")
        return 0
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 baseline (torch's default since 1.12)
    topmin = (0.0, 0.3)
    k_min, k_max = interval_bounds(n - 1, topmin)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # CPU smoke runs of the kernel rows (tiny N)

    z = make_z(n, length, c, device)
    pairs = n * (n - 1) / 2
    print(f"MSM one pass: N={n} L={length} C={c} k=[{k_min},{k_max}) on {device}; "
          f"{2 * length * length * c * pairs / 1e12:.3f} TFLOP per unordered-pair pass", flush=True)

    rows, reference = [], None
    base_ms = None

    def emit(row: dict, out=None) -> None:  # each row goes to the CSV the moment it is measured
        if base_ms:
            row["speedup"] = base_ms / row["ms_p50"]
        if reference is not None and out is not None:
            diff = (out.double() - reference).abs()
            row["max_abs_diff"] = diff[~torch.isnan(diff)].max().item() if diff.numel() else math.nan
        rows.append(row)
        write_rows([row], out_path)
        print_table([row], [*PROVIDER_COLUMNS, "tflops", "speedup", "max_abs_diff"])
        sys.stdout.flush()

    if on_gpu and (args.roofline or args.paper):
        for row in roofline_rows(length, c, sync):
            emit(row)
    if "original" in providers:  # first: every other provider is compared with it
        t, reference = timed(provider_fn("original", "fp32", z, topmin), original_reps, sync, args.single)
        base_ms = t["ms_p50"]
        emit({"bench": "msm", "provider": "original", "precision": "fp32", "n": n, "length": length, "c": c, **t,
              "tflops": 2 * length * length * c * 2 * pairs / (t["ms_p50"] * 1e-3) / 1e12, "max_abs_diff": 0.0})
    kernel_sim = None
    for name in providers:
        if name in ("original", "interval_mean"):
            continue
        if name in ("triton", "triton_fma") and not (on_gpu or interpreted):
            print(f"{name}: skipped (GPU only; the interpreter is for tests)")
            continue
        if name == "faiss":
            from musc_fast.kernels import faiss_available

            ok, why = faiss_available()
            if not ok:
                print(f"faiss: skipped ({why})")
                continue
        name_precisions = precisions
        if name == "triton_fma":
            fma, why = fma_precision()
            print(f"triton_fma: {why}")
            if fma is None:
                continue
            name_precisions = [fma]
        for prec in name_precisions:
            if name == "triton":
                from musc_fast.kernels import mutual_min as mm

                if prec not in mm._PRECISIONS:
                    print(f"triton {prec}: skipped (the kernel offers {sorted(mm._PRECISIONS)})")
                    continue
            elif name != "triton_fma" and prec == "tf32":
                continue
            if prec != "fp32" and (name == "faiss" or (name == "torch" and not on_gpu)):
                continue  # these compute in fp32 whatever is asked: a row would be mislabelled
            fn = provider_fn(name, prec, z, topmin)
            if args.single:  # compile (and warm cuBLAS) on a few images first
                provider_fn(name, prec, z[:24].contiguous(), topmin)()
            t, out = timed(fn, reps, sync, args.single)
            if name.startswith("triton"):
                t["autotune"] = os.environ.get("MUSC_FAST_AUTOTUNE", "0")
                mm = sys.modules.get("musc_fast.kernels.mutual_min")
                if mm is not None and mm._TUNED:
                    print("autotuned mutual-min configs:", mm._TUNED)
                if args.repeat_check:
                    again = fn()
                    t["bitwise_repeat"] = bool(torch.equal(again, out))
                    del again
            flops = 2 * length * length * c * (2 * pairs if name == "faiss" else pairs)
            emit({"bench": "msm", "provider": name, "precision": prec, "n": n, "length": length, "c": c, **t,
                  "tflops": flops / (t["ms_p50"] * 1e-3) / 1e12}, out)
            del out
    if "interval_mean" in providers:
        if not (on_gpu or interpreted):
            print("interval_mean: skipped (GPU only)")
        else:
            from musc_fast.kernels import interval_mean_triton, nearest_similarity_triton

            kernel_sim = nearest_similarity_triton(z, precision="bf16")
            t, out = timed(lambda: interval_mean_triton(kernel_sim, k_min, k_max), reps, sync, args.single)
            gbytes = kernel_sim.numel() * 4 / 1e9
            emit({"bench": "msm", "provider": "interval_mean", "precision": "fp32 sim", "n": n, "length": length,
                  "c": c, **t, "tflops": "", "gbps": gbytes / (t["ms_p50"] * 1e-3),
                  "note": "interval-mean kernel alone on a bf16-kernel similarity table"})
            del kernel_sim, out
    print(f"\nall rows ({len(rows)}) appended to {out_path} as they finished")
    print_table(rows, [*PROVIDER_COLUMNS, "tflops", "speedup", "max_abs_diff"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
