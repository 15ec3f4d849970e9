"""The end-to-end ladder: the original-style pipeline against each of our paths, on the same images.

Rows (each in its own subprocess, so that peak memory is the row's own):
    original        backbone, tokens bounced through the CPU, LNAMD per r with Unfold + CPU L2 norm,
                    per-query cdist MSM in fp32 (SPEC 3.1; bench/original_style.py)
    torch_per_r     our torch path, one LNAMD + MSM pass per (layer, r)       (MUSC_FAST_BOXGRAM=0)
    torch_one_gram  our torch path, one Gram block per layer for every r      (MUSC_FAST_NATIVE=0)
    native_one_gram the same with the fused C one-Gram kernel                  (the CPU default; CPU only)
    triton_fp32     Triton LNAMD + mutual-min kernels, exact fp32             (CUDA only)
    triton_bf16     the same with bf16 matmul inputs                           (CUDA only)
    one_gram_bf16   the one-Gram torch path with bf16 matmuls                  (CUDA only)

Every row reports ms/image per stage, the MSM matmul TFLOP/s it executed, peak memory, and how far its
patch scores, image scores and image AUROC are from the original-style row of the same run.

    python bench/bench_e2e.py                       # CPU: ViT-B-16 at 224, N=48, bottle images
    python bench/bench_e2e.py --quick               # a smoke run
    python bench/bench_e2e.py --backbone dinov2_vitl14 --image-size 518 --layers 5 11 17 23 --n 200
                                                    # GPU: the paper's cost (ViT-L/14, 1369 patches)
    python bench/bench_e2e.py --backbone efficientnet_lite0 --pretrained imagenet --image-size 256 \
        --layers 2 3 4 --n 83 --rows original torch_per_r torch_one_gram native_one_gram
                                                    # real weights: the image AUROC each row keeps
Weights are random by default (speed does not depend on them); labels come from the image folders.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import env_info, print_table, write_rows  # noqa: E402

ROWS = {
    "original": {},
    "torch_per_r": {"MUSC_FAST_MSM": "torch", "MUSC_FAST_LNAMD": "torch", "MUSC_FAST_BOXGRAM": "0"},
    "torch_one_gram": {"MUSC_FAST_MSM": "torch", "MUSC_FAST_LNAMD": "torch", "MUSC_FAST_BOXGRAM": "1",
                       "MUSC_FAST_NATIVE": "0"},
    "native_one_gram": {"MUSC_FAST_MSM": "torch", "MUSC_FAST_LNAMD": "torch", "MUSC_FAST_BOXGRAM": "1",
                        "MUSC_FAST_NATIVE": "1"},
    "triton_fp32": {"MUSC_FAST_MSM": "triton", "MUSC_FAST_LNAMD": "triton", "MUSC_FAST_BOXGRAM": "0"},
    "triton_bf16": {"MUSC_FAST_MSM": "triton", "MUSC_FAST_LNAMD": "triton", "MUSC_FAST_BOXGRAM": "0"},
    "one_gram_bf16": {"MUSC_FAST_MSM": "torch", "MUSC_FAST_LNAMD": "torch", "MUSC_FAST_BOXGRAM": "1"},
    "triton_fp16": {"MUSC_FAST_MSM": "triton", "MUSC_FAST_LNAMD": "triton", "MUSC_FAST_BOXGRAM": "0"},
}
BF16_ROWS = {"triton_bf16", "one_gram_bf16"}
FP16_ROWS = {"triton_fp16"}
GPU_ROWS = {"triton_fp32", "triton_bf16", "one_gram_bf16", "triton_fp16"}
CPU_ROWS = {"native_one_gram"}  # the fused C one-Gram kernel is a CPU provider
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_bottle" / "bottle" / "test"


def pick_images(folder: Path | None, n: int) -> tuple[list[str], np.ndarray]:
    """n image paths spread evenly over the sorted files under ``folder`` (labels: folder != good/ok),
    or no paths (random images) when the folder is missing or holds fewer than n images."""
    if folder is None or not folder.is_dir():
        return [], np.zeros(0, dtype=np.int64)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".bmp", ".jpeg"})
    if len(files) < n:
        return [], np.zeros(0, dtype=np.int64)
    chosen = [files[i * len(files) // n] for i in range(n)]
    labels = np.array([0 if p.parent.name.lower() in ("good", "ok") else 1 for p in chosen])
    return [str(p) for p in chosen], labels


def msm_flops(row: str, n: int, length: int, c: int, n_layers: int, n_r: int) -> float:
    """Matmul FLOPs the row's mutual scoring executes (filters and maxima not counted)."""
    per_pair = 2.0 * length * length * c
    if row == "original":
        return n * (n - 1) * per_pair * n_layers * n_r  # every ordered pair, every pass
    passes = n_layers if "one_gram" in row else n_layers * n_r
    return n * (n - 1) / 2 * per_pair * passes  # each unordered pair once


def run_row(args: argparse.Namespace) -> dict:
    """Measure one row in this process; returns its numbers and writes its scores to ``args.scores_out``."""
    from musc_fast import MuSc, MuScConfig, score_features
    from musc_fast.ops import maps_and_image_scores, rscin
    from musc_fast.pipeline import _Timer

    torch.manual_seed(0)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = MuScConfig(backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
                        layers=tuple(args.layers), r_list=tuple(args.r_list), batch_size=args.batch_size,
                        device=str(device),
                        msm_precision="bf16" if args.row in BF16_ROWS else "fp16" if args.row in FP16_ROWS else "fp32")
    model = MuSc(config, num_workers=0)
    paths, _ = pick_images(Path(args.images) if args.images else None, args.n)
    if paths:
        pixels = model.preprocess(paths, progress=False)
    else:  # random images: speed does not depend on content
        pixels = model.preprocess(torch.rand(args.n, 3, args.image_size, args.image_size), progress=False)
    model.extract(pixels[: min(2, len(pixels))], progress=False)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = _Timer(device)
    start = time.perf_counter()
    with timer.stage("backbone"):
        tokens, cls = model.extract(pixels, progress=False)
    provider = "original"
    if args.row == "original":
        from bench.original_style import lnamd_original, msm_original

        cpu_tokens = [t.cpu() for t in tokens]  # the original keeps tapped tokens on the CPU
        per_r = []
        for r in args.r_list:  # patch_scores_original, with LNAMD and MSM timed apart
            maps_r = []
            for t in cpu_tokens:
                with timer.stage("lnamd"):
                    z = lnamd_original(t, r)
                with timer.stage("msm"):
                    maps_r.append(msm_original(z, device))
            per_r.append(torch.stack(maps_r).mean(0))
        patch = torch.stack(per_r).mean(0)
        g = int(round(patch.shape[1] ** 0.5))
        with timer.stage("maps"):
            maps, raw = maps_and_image_scores(patch.view(-1, g, g).to(device), args.image_size)
        with timer.stage("rscin"):
            final = rscin(raw.numpy(), cls, config.rscin_k)
        patch_np = patch.numpy()
    else:
        res = score_features(tokens, cls, image_size=args.image_size, r_list=args.r_list,
                             rscin_k=config.rscin_k, msm_precision=config.msm_precision, _timer=timer)
        raw, final, patch_np = res.raw_image_scores, res.image_scores, res.patch_scores.reshape(args.n, -1)
        provider = "+".join(sorted({p["op"] + ":" + p["provider"] for p in res.plan}))  # what actually ran
    total = time.perf_counter() - start
    n, length, c = tokens[0].shape
    ms = {k: v / n for k, v in timer.ms.items()}
    msm_ms = ms.get("msm", 0.0) + ms.get("lnamd+msm", 0.0) + (ms.get("lnamd", 0.0) if args.row == "original" else 0)
    flops = msm_flops(args.row, n, length, c, len(args.layers), len(args.r_list))
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.savez(args.scores_out, patch=patch_np, raw=np.asarray(raw), final=np.asarray(final))
    row = {
        "row": args.row, "n": n, "L": length, "C": c, "backbone": args.backbone, "image_size": args.image_size,
        "device": str(device), "msm_provider": provider, "ms_per_image": 1e3 * total / n,
        **{f"ms_{k}": round(v, 3) for k, v in ms.items()},
        "msm_tflop": flops / 1e12, "msm_tflops_per_s": flops / 1e12 / max(msm_ms * n / 1e3, 1e-9),
        "peak_mb": round(peak_mb, 1), "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
    }
    if args.row == "original" and args.extrapolate_to and args.extrapolate_to != n:
        row = extrapolate_original(row, n, args.extrapolate_to)
    return row


def extrapolate_original(row: dict, n_measured: int, n_target: int) -> dict:
    """The original-style row measured at a small N, scaled to ``n_target`` images. Per image, the
    backbone, LNAMD, maps and RsCIN cost the same at any N; the per-query cdist MSM costs (N-1) times the
    per-pair work. So ms_msm per image scales by (N_target - 1) / (N_measured - 1). Labelled as such."""
    scale = (n_target - 1) / (n_measured - 1)
    out = dict(row, row="original_extrapolated", n=n_target, n_measured=n_measured,
               note=f"measured at N={n_measured}; ms_msm x (N-1)/({n_measured}-1), other stages per image as measured")
    out["ms_msm"] = round(row.get("ms_msm", 0.0) * scale, 3)
    out["ms_per_image"] = row["ms_per_image"] + row.get("ms_msm", 0.0) * (scale - 1)
    out["msm_tflop"] = row["msm_tflop"] * scale * n_target / n_measured
    return out


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if len(labels) == 0 or labels.min() == labels.max():
        return None
    from musc_fast.metrics import curve_metrics

    return float(curve_metrics(labels, scores)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--pretrained", type=lambda v: None if v.lower() == "none" else v, default=None,
                    help="weights tag (default none: random weights; e.g. imagenet for efficientnet_lite0)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 5, 8, 11])
    ap.add_argument("--r-list", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images ('' = random images)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"subset of {', '.join(ROWS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="N=8 at 112 px: a smoke run")
    ap.add_argument("--out", default=None, help="CSV (default bench/results/bench_e2e_<device>.csv)")
    ap.add_argument("--original-n", type=int, default=0,
                    help="measure the original-style row at this many images and extrapolate it to --n (labelled)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, rows and backbone name only")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    ap.add_argument("--scores-out", help=argparse.SUPPRESS)
    ap.add_argument("--extrapolate-to", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.n, args.image_size = 8, 112
    if args.row:
        print(json.dumps(run_row(args)))
        return

    cuda = torch.cuda.is_available() and args.device != "cpu"
    rows = args.rows or [r for r in ROWS if (r not in CPU_ROWS if cuda else r not in GPU_ROWS)]
    device = "cuda" if cuda else "cpu"
    out_csv = Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_e2e_{device}.csv"
    if args.dry_run:
        from musc_fast import backbones

        bad = [r for r in rows if r not in ROWS]
        if bad or args.backbone not in backbones.available():
            ap.error(f"unknown rows {bad} or backbone {args.backbone!r}")
        print(f"dry run ok: rows {rows}, {args.backbone} at {args.image_size} px, N={args.n}, out {out_csv}")
        return
    _, labels = pick_images(Path(args.images) if args.images else None, args.n)
    results, scores, base_ms = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            out = Path(tmp) / f"{row}.npz"
            n_row = args.original_n if row == "original" and args.original_n else args.n
            cmd = [sys.executable, __file__, "--row", row, "--scores-out", str(out), "--backbone", args.backbone,
                   "--pretrained", str(args.pretrained),
                   "--image-size", str(args.image_size), "--n", str(n_row), "--batch-size", str(args.batch_size),
                   "--images", args.images, "--device", args.device, "--layers", *map(str, args.layers),
                   "--r-list", *map(str, args.r_list), "--extrapolate-to", str(args.n)]
            proc = subprocess.run(cmd, env={**os.environ, **ROWS[row]}, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{row}: failed\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            s = dict(np.load(out))
            if row == "original":
                base_ms = r["ms_per_image"]
                if n_row == args.n:
                    scores["original"] = s
            base = scores.get("original")
            r["speedup_vs_original"] = round(base_ms / r["ms_per_image"], 2) if base_ms else None
            if base is not None and row != "original":
                r["max_abs_patch_diff"] = float(np.abs(s["patch"] - base["patch"]).max())
                r["max_abs_image_diff"] = float(np.abs(s["final"] - base["final"]).max())
            r["image_auroc"] = _auroc(labels, s["final"]) if n_row == args.n else None
            results.append(r)
            write_rows([r], out_csv)  # each row the moment it finishes
            print(json.dumps(r), flush=True)
    columns = list(dict.fromkeys(k for r in results for k in r))  # union of keys, first-seen order
    print_table(results, columns)
    print(f"\nwrote {out_csv}; machine: {env_info().get('cpu', '')}")


if __name__ == "__main__":
    main()
