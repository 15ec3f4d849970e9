"""MSM matmul precision (``msm_precision`` fp32 / fp16 / bf16) on the shared real data sets: metrics and
the largest score differences from fp32, with the offline backbone (EfficientNet-Lite0, real weights).

The backbone runs once per set; its tokens are scored by ``score_features`` once per precision. Rows go
to the CSV the moment each finishes (set, precision, every metric x100, max |delta| of the image scores
(after RsCIN), of the raw image scores and of the anomaly maps from the fp32 run of the same tokens).

On the CPU the torch path computes every precision in fp32 (16-bit matmuls gain nothing there), so a
plain CPU run would show fp16 == fp32. This script therefore *emulates the GPU kernels' numerics* on the
CPU: each MSM pass rounds its unit rows Z to fp16/bf16 once (as the Triton mutual-min wrapper casts Z
once) and multiplies them in fp32 (products of 16-bit values are exact in fp32; the tensor cores
accumulate in fp32), keeping the similarities and their maxima in fp32. Only the summation order differs
from a GPU run. ``--emulate torch16`` instead also rounds every similarity to the 16-bit type, as the
CUDA torch fallback does (its ``a @ b`` returns fp16/bf16).

    python bench/bench_msm_precision.py                          # both sets, 256 px (the README table)
    python bench/bench_msm_precision.py --sets mvtec_bottle --image-size 160
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.harness import print_table, write_rows

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# set name -> (reader, folder under the data root, category): the commands of the README results table
SETS = {"mvtec_bottle": ("mvtec", "mvtec_bottle", "bottle"), "mtd": ("folder", "mtd", "magnetic_tile")}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def emulated_precision(precision: str, mode: str):
    """Make the CPU torch MSM path compute like the CUDA one in ``precision`` (see the module docstring).

    mode "kernel": Z rounded to the 16-bit type once per pass, fp32 products and maxima (Triton kernels).
    mode "torch16": additionally every product block rounded to the 16-bit type (CUDA torch path).
    """
    import dataclasses

    from musc_fast import engine
    from musc_fast.ops import msm

    if precision == "fp32":
        yield
        return
    dtype = _DTYPES[precision]
    saved_pass, saved_product = engine.run_msm, msm.product_into

    def run_msm(z, plan, *args):
        plan = dataclasses.replace(plan, precision="fp32")  # z is already rounded: fp32 multiplies 16-bit values
        return saved_pass(z.to(dtype).to(z.dtype), plan, *args)

    def product_into(a, b_t, work):
        return saved_product(a, b_t, work).to(dtype).float()

    engine.run_msm = run_msm
    if mode == "torch16":
        msm.product_into = product_into
    try:
        yield
    finally:
        engine.run_msm, msm.product_into = saved_pass, saved_product


def load_set(name: str, data_root: Path, image_size: int):
    """(category, config, pixels, masks or None) for one shared set at ``image_size``."""
    from musc_fast import MuSc, MuScConfig
    from musc_fast.data import load_category, load_masks

    reader, folder, cat_name = SETS[name]
    category = load_category(reader, data_root / folder, cat_name)
    config = MuScConfig.preset("offline", image_size=image_size, device="cpu")
    model = MuSc(config, num_workers=0)
    pixels = model.preprocess([str(p) for p in category.paths], progress=False)
    masks = None
    if category.has_masks:
        masks = load_masks(category.mask_paths, image_size, category.mask_rule, num_workers=0,
                           progress=False).numpy()
    return category, config, model, pixels, masks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="mvtec_bottle,mtd", help=f"comma list of {', '.join(SETS)}")
    ap.add_argument("--precisions", default="fp32,fp16,bf16", help="fp32 first: the others are compared with it")
    ap.add_argument("--image-size", type=int, default=256, help="S (256: the README results table)")
    ap.add_argument("--emulate", choices=["kernel", "torch16"], default="kernel",
                    help="which CUDA path's 16-bit numerics to emulate on the CPU (module docstring)")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "msm_precision_cpu.csv"))
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and the data folders only")
    args = ap.parse_args(argv)

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [s for s in sets if s not in SETS] + [p for p in precisions if p not in ("fp32", *_DTYPES)]
    if bad or precisions[:1] != ["fp32"]:
        ap.error(f"unknown sets/precisions {bad}, or fp32 not first: {precisions}")
    root = Path(args.data_root)
    missing = [s for s in sets if not (root / SETS[s][1]).is_dir()]
    if missing:
        print(f"data sets missing under {root}: {missing}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"dry run ok: sets {sets}, precisions {precisions}, {args.image_size} px, out {args.out}")
        return 0

    from musc_fast import score_features
    from musc_fast.metrics import compute_metrics
    from musc_fast.outputs import METRIC_COLUMNS, as_percent

    os.environ.setdefault("MUSC_FAST_BOXGRAM", "0")  # per-r passes: where the emulation hooks in
    rows = []
    for name in sets:
        t0 = time.perf_counter()
        category, config, model, pixels, masks = load_set(name, root, args.image_size)
        tokens, cls = model.extract(pixels, progress=False)
        tokens = [t.float() for t in tokens]
        t_backbone = time.perf_counter() - t0
        labels = np.asarray(category.labels, dtype=np.int64)
        print(f"[{name}] {len(labels)} images, tokens {[tuple(t.shape) for t in tokens]}, backbone "
              f"{t_backbone:.1f} s", flush=True)
        ref = ref_metrics = None
        for prec in precisions:
            t1 = time.perf_counter()
            with emulated_precision(prec, args.emulate):
                res = score_features(tokens, cls, image_size=config.image_size, r_list=config.r_list,
                                     topmin=config.topmin, rscin_k=config.rscin_k, msm_precision=prec,
                                     device="cpu")
            seconds = time.perf_counter() - t1
            metrics = as_percent(compute_metrics(labels, res.image_scores, masks, res.anomaly_maps))
            if ref is None:
                ref, ref_metrics = res, metrics
            d_metric = max((abs(v - ref_metrics[k]) for k, v in metrics.items() if v is not None), default=0.0)
            row = {"set": name, "precision": prec, "emulated": "" if prec == "fp32" else args.emulate,
                   "n_images": len(labels), "image_size": config.image_size, "backbone": config.backbone,
                   **{k: metrics.get(k) for k in METRIC_COLUMNS},
                   "max_abs_d_image": float(np.abs(res.image_scores - ref.image_scores).max()),
                   "max_abs_d_raw_image": float(np.abs(res.raw_image_scores - ref.raw_image_scores).max()),
                   "max_abs_d_map": float(np.abs(res.anomaly_maps - ref.anomaly_maps).max()),
                   "max_abs_d_metric": d_metric,
                   "score_seconds": round(seconds, 2)}
            rows.append(row)
            write_rows([row], args.out)  # each row the moment it finishes
            print(f"[{name}] {prec}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None)
                  + f"; max |d image| {row['max_abs_d_image']:.2e}, max |d map| {row['max_abs_d_map']:.2e}, "
                  f"{seconds:.1f} s", flush=True)
    print_table(rows, ["set", "precision", *METRIC_COLUMNS, "max_abs_d_metric", "max_abs_d_image",
                       "max_abs_d_map"])
    print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
