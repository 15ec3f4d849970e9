"""Benchmark LNAMD for one layer and all r of r_list (SPEC 2): the original's recipe against musc_fast's.

Providers:
  original  the original's recipe: per batch of ``--batch`` images and per r, a fresh LayerNorm over
            (C, G, G), then for r > 1 Unfold (kernel r, zero padding) and an adaptive average pool of each
            C r^2 vector down to C; the result moved to the CPU and L2-normalised there (as the original
            does, SPEC 2 step 4). On a GPU the LN/Unfold/pool run on the GPU, as in the original.
  torch     musc_fast.ops.lnamd.lnamd_multi_torch: one LayerNorm shared by all r, avg_pool2d, normalise.
  triton    musc_fast.kernels.lnamd_triton (GPU only): all r from one read of the tokens; precision
            "bf16" writes bf16 Z (half the bytes; what the bf16 MSM kernel reads).

Reported: ms p20/p50/p80, useful GB/s (tokens read once + each Z written once; the same byte count for
every provider, so GB/s compare like speed-ups), speed-up over the original, max abs difference from the
torch path's fp32 output.

    python bench/bench_lnamd.py                 # N=16, G=14 (L=196), C=768, fp16 tokens
    python bench/bench_lnamd.py --quick
    python -m bench.bench_lnamd --paper         # GPU: N=200, G=37 (L=1369), C=1024

CPU numbers on a shared machine are noisy: don't commit them. Rows go to bench/results/ (``--out``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.harness import measure, report_providers
from musc_fast.ops.lnamd import lnamd_multi_torch

PAPER = dict(n=200, grid=37, c=1024)


def original_lnamd(tokens: torch.Tensor, r_list, batch: int) -> list[torch.Tensor]:
    """The original's recipe (SPEC 2). tokens [N, L, C] (any float dtype, on the compute device) ->
    one [N, L, C] fp32 CPU tensor per r."""
    n, length, c = tokens.shape
    g = int(round(length ** 0.5))
    outs = {r: [] for r in r_list}
    for b0 in range(0, n, batch):
        x = tokens[b0:b0 + batch].float().transpose(1, 2).reshape(-1, c, g, g)  # (B, C, G, G)
        for r in r_list:
            # A fresh LayerNorm([C, G, G]) per r (weight 1, bias 0), as the original recomputes it.
            y = F.layer_norm(x, (c, g, g), eps=1e-5)
            if r == 1:
                feat = y.reshape(-1, c, length).transpose(1, 2)
            else:
                u = F.unfold(y, kernel_size=r, padding=(r - 1) // 2, stride=1)  # (B, C r^2, L)
                u = u.transpose(1, 2).reshape(-1, 1, c * r * r)
                feat = F.adaptive_avg_pool1d(u, c).reshape(-1, length, c)
            outs[r].append(F.normalize(feat.cpu(), dim=-1))  # L2 on the CPU, as the original
    return [torch.cat(outs[r]) for r in r_list]


def make_tokens(n: int, g: int, c: int, device: str, dtype, seed: int = 0) -> torch.Tensor:
    """ViT-like tokens: outlier channels with large offsets, per-image scales."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(c, generator=gen))
    offset = 5 * torch.randn(c, generator=gen)
    x = torch.empty(n, g * g, c)
    for i in range(n):
        x[i] = (torch.randn(g * g, c, generator=gen) * scale + offset) * (1 + 0.1 * i)
    return x.to(device=device, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--grid", type=int, default=14, help="G: L = G*G patches")
    ap.add_argument("--c", type=int, default=768)
    ap.add_argument("--r-list", default="1,3,5")
    ap.add_argument("--batch", type=int, default=4, help="images per batch in the original's recipe")
    ap.add_argument("--token-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--paper", action="store_true", help="N=200, G=37, C=1024 (GPU)")
    ap.add_argument("--quick", action="store_true", help="N=4, G=7, C=64, 2 reps")
    ap.add_argument("--providers", default="original,torch,triton")
    ap.add_argument("--precision", default="fp32,bf16", help="Z dtype for triton: fp32 (exact), bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/bench_lnamd_<device>.csv)")
    args = ap.parse_args(argv)

    n, g, c, reps = args.n, args.grid, args.c, args.reps
    if args.paper:
        n, g, c = PAPER["n"], PAPER["grid"], PAPER["c"]
        reps = reps or 3
    if args.quick:
        n, g, c = 4, 7, 64
        reps = reps or 2
    reps = reps or 5
    device = args.device
    on_gpu = device.startswith("cuda")
    sync = "cuda" if on_gpu else None
    r_list = [int(r) for r in args.r_list.split(",")]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.token_dtype]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]

    x = make_tokens(n, g, c, device, dtype)
    length = g * g
    print(f"LNAMD one layer: N={n} L={length} C={c} r={r_list} {args.token_dtype} tokens on {device}")
    expected = [z.cpu() for z in lnamd_multi_torch(x, r_list)]

    def bytes_moved(out_itemsize: int) -> int:
        return n * length * c * (x.element_size() + len(r_list) * out_itemsize)

    jobs = []
    if "original" in providers:
        jobs.append(("original", "fp32", lambda: original_lnamd(x, r_list, args.batch), 4))
    if "torch" in providers:
        jobs.append(("torch", "fp32", lambda: lnamd_multi_torch(x, r_list), 4))
    if "triton" in providers:
        if not on_gpu:
            print("triton: skipped (GPU only; the interpreter is for tests)")
        else:
            from musc_fast.kernels import lnamd_triton

            for prec in precisions:
                out_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
                jobs.append(("triton", prec, lambda o=out_dtype: lnamd_triton(x, r_list, out_dtype=o),
                             torch.tensor([], dtype=out_dtype).element_size()))
    rows = []
    for name, prec, fn, out_size in jobs:
        t = measure(fn, warmup=1, reps=reps, sync=sync)
        outs = fn()
        diff = max((o.float().cpu() - e).abs().max().item() for o, e in zip(outs, expected))
        rows.append({"bench": "lnamd", "provider": name, "precision": prec, "n": n, "length": length, "c": c,
                     "r_list": "/".join(map(str, r_list)), "token_dtype": args.token_dtype, **t,
                     "gbps": bytes_moved(out_size) / (t["ms_p50"] * 1e-3) / 1e9, "max_abs_diff": diff})
        del outs
    report_providers(rows, "gbps", "bench_lnamd", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
