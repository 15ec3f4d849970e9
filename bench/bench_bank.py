"""Bank scoring: milliseconds per new image vs bank size M, one image per call (a production line).

Two feature sources, labelled in every row (``features`` column):

* ``efficientnet_lite0`` (the offline backbone, when it is registered): images from a shared data set
  (or synthetic ones) are embedded once; their tokens are tiled to fill banks of M images. Rows give
  the end-to-end time (decode + backbone + scoring) and the scoring time alone.
* ``random-tokens`` (fallback, or ``--random``): random tokens of a given shape; scoring time only.
  CPU default shape: ViT-B-16 at 224 px (L = 196, C = 768, 4 layers); on CUDA the paper shape
  (L = 1369, C = 1024, 4 layers, fp16 tokens).

r = 1, 3, 5 everywhere. ``ms_first`` includes building the bank's Z cache (when the memory plan allows
one); ``ms_p50`` is the steady state.

    python bench/bench_bank.py --quick                 # M = 5, 10, 20
    python bench/bench_bank.py --sizes 10 50 200
    python bench/bench_bank.py --random --length 1369 --channels 1024 --device cuda --csv results.csv
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _measure(fn, *, warmup: int, reps: int, cuda: bool) -> dict:
    """bench.harness.measure when it exists, else the same quantiles from a plain loop."""
    try:
        from bench.harness import measure
    except ImportError:
        measure = None
    if measure is not None:
        return measure(fn, warmup=warmup, reps=reps, sync="cuda" if cuda else None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first, times = float("nan"), []
    for i in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ms = 1e3 * (time.perf_counter() - t0)
        if i == 0:
            first = ms
        if i >= warmup:
            times.append(ms)
    p20, p50, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    return {"ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "ms_first": first, "reps": reps,
            "timer": "perf_counter"}


def _offline_model(device: str):
    """MuSc with the offline backbone, or None when it is not available (not merged, no weights)."""
    from musc_fast import MuSc, MuScConfig

    try:
        model = MuSc(MuScConfig.preset("offline", device=device))
        _ = model.backbone  # builds it: fails here when the backbone is missing
        return model
    except (ValueError, ImportError, RuntimeError, OSError) as exc:
        print(f"offline backbone unavailable ({' '.join(str(exc).split())[:120]}); using random tokens",
              file=sys.stderr)
        return None


def _images(k: int) -> list:
    """Up to k image paths from the shared bottle set, else k synthetic PIL images."""
    root = REPO.parent / "shared" / "datasets" / "mvtec_bottle" / "bottle" / "test" / "good"
    paths = sorted(str(p) for p in root.glob("*.png"))[:k] if root.is_dir() else []
    if paths:
        return paths
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(k)]


def _tile(t: torch.Tensor, m: int) -> torch.Tensor:
    reps = -(-m // len(t))
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:m].contiguous()


def bench(args: argparse.Namespace) -> list[dict]:
    from musc_fast import MuScConfig
    from musc_fast.bank import Bank

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    model = None if args.random else _offline_model(args.device)
    rows = []
    if model is not None:
        items = _images(max(8, min(32, max(args.sizes))) + 1)
        query, refs = items[:1], items[1:]
        tokens, cls = model.extract(model.preprocess(refs, progress=False), progress=False)
        cfg = model.config
        features = cfg.backbone
    else:
        cfg = MuScConfig(backbone="random-tokens", pretrained=None, image_size=args.image_size,
                         layers=tuple(range(args.layers)), r_list=(1, 3, 5), device=args.device)
        dtype = torch.float16 if (cuda and not args.fp32) else torch.float32
        gen = torch.Generator().manual_seed(0)
        proto = [torch.randn((1, args.length, args.channels), generator=gen) for _ in range(args.layers)]
        tokens = [(p + 0.7 * torch.randn((max(args.sizes) + 1, args.length, args.channels), generator=gen))
                  .to(dtype) for p in proto]
        cls = torch.randn((max(args.sizes) + 1, 16), generator=gen)
        features = "random-tokens"
    for m in args.sizes:
        if model is not None:
            bank = Bank.from_features([_tile(t, m) for t in tokens], _tile(cls, m), config=cfg)
            bank._model = model
            q_tokens, _ = model.extract(model.preprocess(query, progress=False), progress=False,
                                        need_cls=False)
            e2e = _measure(lambda b=bank: b.score(query), warmup=1, reps=args.reps, cuda=cuda)
        else:
            bank = Bank.from_features([t[1:m + 1] for t in tokens], cls[1:m + 1], config=cfg)
            q_tokens, e2e = [t[:1] for t in tokens], None
        score = _measure(lambda b=bank, q=q_tokens: b.score_features(q), warmup=1, reps=args.reps, cuda=cuda)
        row = {"features": features, "bank_size": m, "L": bank.num_patches,
               "C": " ".join(str(t.shape[2]) for t in bank.tokens), "layers": len(bank.tokens),
               "token_dtype": str(bank.tokens[0].dtype).replace("torch.", ""), "device": str(dev),
               "score_ms_p50": round(score["ms_p50"], 2), "score_ms_p20": round(score["ms_p20"], 2),
               "score_ms_p80": round(score["ms_p80"], 2), "score_ms_first": round(score["ms_first"], 2),
               "e2e_ms_p50": round(e2e["ms_p50"], 2) if e2e else "",
               "bank_mb": round(bank.nbytes() / 2**20, 1)}
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--quick", action="store_true", help="bank sizes 5, 10, 20 and 2 repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random", action="store_true", help="random tokens even if the backbone exists")
    p.add_argument("--length", type=int, default=None, help="random tokens: L (CPU 196, CUDA 1369)")
    p.add_argument("--channels", type=int, default=None, help="random tokens: C (CPU 768, CUDA 1024)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=None, help="random tokens: map side S")
    p.add_argument("--fp32", action="store_true", help="random tokens in fp32 on CUDA too")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--csv", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    paper = args.device.startswith("cuda")
    args.length = args.length or (1369 if paper else 196)
    args.channels = args.channels or (1024 if paper else 768)
    args.image_size = args.image_size or (518 if paper else 224)
    if args.quick:
        args.sizes, args.reps = [5, 10, 20], 2
    rows = bench(args)
    if args.csv:
        from bench.bench_memory import _write_csv

        _write_csv(rows, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
