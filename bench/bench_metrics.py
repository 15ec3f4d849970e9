"""Benchmark musc_fast.metrics.compute_metrics against a straightforward implementation of SPEC 6.

The baseline does what the original does: sklearn's roc_auc_score / average_precision_score /
precision_recall_curve on the flattened pixels (three sorts), and MuSc's PRO loop that binarises the maps
at each of ~200 thresholds and relabels every mask with skimage at every threshold. For aupro_mvtec it
uses the official MVTec recipe (argsort of all pixels, cumulative sums). It takes minutes at N=200, 518 px.

    python -m bench.bench_metrics                 # N=200, 518x518, maps with ties (rounded to 1/4096)
    python bench/bench_metrics.py --n 20 --size 256 --no-ties --out /tmp/x.csv
    python -m bench.bench_metrics --skip-baseline # our timing only

Needs scikit-learn and scikit-image (test extras) for the baseline.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.harness import REPO, measure, print_table, write_rows
from musc_fast.metrics import IMAGE_METRICS, METRIC_NAMES, PRO_FPR_LIMIT, PRO_STEPS, compute_metrics


def synthetic(n: int, size: int, *, ties: bool = True, seed: int = 0):
    """Blobby GT masks and MuSc-like maps. Returns labels [n] i64, scores [n] f64, masks [n,S,S] bool,
    maps [n,S,S] f64.

    Maps are 37x37 noise upsampled bilinearly (align_corners=True, as MuSc does) plus a bump over each
    defect; about 60 % of the images carry 1-3 elliptic blobs. ``ties`` rounds maps to 1/4096.
    """
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    masks = np.zeros((n, size, size), bool)
    bumps = np.zeros((n, size, size), np.float32)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.1, 0.9, 2)
            ry, rx = rng.uniform(0.01, 0.12, 2)
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            masks[i] |= d <= 1
            bumps[i] += rng.uniform(0.02, 0.4) * np.exp(-0.5 * d / 1.5**2)
    grid = torch.from_numpy(rng.random((n, 1, 37, 37)))
    maps = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[:, 0].numpy()
    maps = 0.4 * rng.uniform(0.6, 1.4, (n, 1, 1)) * maps + bumps  # per-image gain: image scores overlap
    if ties:
        maps = np.round(maps * 4096) / 4096
    scores = maps.reshape(n, -1).max(1)
    return labels, scores, masks, maps


def _segment_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x ascending) from x[0] to x_max, each segment clipped at x_max."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    xe = np.minimum(x1, x_max)
    ok = (x0 < x_max) & (x1 > x0)
    ye = y0[ok] + (y1[ok] - y0[ok]) * (xe[ok] - x0[ok]) / (x1[ok] - x0[ok])
    return float(np.sum((xe[ok] - x0[ok]) * (y0[ok] + ye) / 2))


def baseline_metrics(labels, scores, masks, maps) -> dict:
    """SPEC 6 done the straightforward way (sklearn + skimage); undefined metrics are NaN."""
    from skimage import measure
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

    def curves(gt, pr):
        if gt.min() == gt.max():
            return math.nan, math.nan, math.nan
        p, r, _ = precision_recall_curve(gt, pr)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * p * r / (p + r)
        return roc_auc_score(gt, pr), np.max(f1[np.isfinite(f1)]), average_precision_score(gt, pr)

    labels = (np.asarray(labels) != 0).astype(int)
    masks = (np.asarray(masks) != 0).astype(np.int32)
    maps = np.asarray(maps)
    out = dict(zip(IMAGE_METRICS, curves(labels, np.asarray(scores)), strict=True))
    out["auroc_px"], out["f1_px"], out["ap_px"] = curves(masks.ravel(), maps.ravel())

    # MuSc's PRO: relabel the GT at every threshold, as the original loop does.
    pros, fprs = [], []
    lo, hi = maps.min(), maps.max()
    for th in np.arange(lo, hi, (hi - lo) / PRO_STEPS):
        binary = maps > th
        overlaps = []
        for b, m in zip(binary, masks, strict=True):
            for reg in measure.regionprops(measure.label(m, connectivity=2)):
                overlaps.append(b[reg.coords[:, 0], reg.coords[:, 1]].sum() / reg.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(masks == 0, binary).sum() / (masks == 0).sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < PRO_FPR_LIMIT
    f = fprs[keep]
    out["aupro"] = auc((f - f.min()) / (f.max() - f.min()), pros[keep])

    # Official MVTec AU-PRO: one argsort of all pixels, per-pixel FP / PRO increments, cumulative sums.
    region_w = np.zeros(maps.shape)
    n_regions = 0
    for i, m in enumerate(masks):
        lab = measure.label(m, connectivity=2)
        for k in range(1, lab.max() + 1):
            region_w[i][lab == k] = 1.0 / np.count_nonzero(lab == k)
        n_regions += lab.max()
    flat = maps.ravel()
    order = np.argsort(flat, kind="stable")[::-1]
    s = flat[order]
    fp = np.cumsum(masks.ravel()[order] == 0) / np.count_nonzero(masks == 0)
    pro = np.cumsum(region_w.ravel()[order]) / n_regions
    last = np.append(s[1:] != s[:-1], True)
    x = np.concatenate(([0.0], fp[last], [1.0]))
    y = np.concatenate(([0.0], pro[last], [1.0]))
    out["aupro_mvtec"] = _segment_area(x, y, PRO_FPR_LIMIT) / PRO_FPR_LIMIT
    return {k: float(v) for k, v in out.items()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images (default 200)")
    ap.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    ap.add_argument("--no-ties", dest="ties", action="store_false", help="keep maps unrounded")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of ours (default 5)")
    ap.add_argument("--skip-baseline", action="store_true", help="time ours only")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_metrics_cpu.csv"))
    args = ap.parse_args(argv)

    labels, scores, masks, maps = synthetic(args.n, args.size, ties=args.ties)
    case = {"n": args.n, "size": args.size, "ties": args.ties,
            "pos_px_frac": round(float(masks.mean()), 4),
            "distinct_scores": int(np.unique(maps).size)}
    ours = compute_metrics(labels, scores, masks, maps)
    t_ours = measure(lambda: compute_metrics(labels, scores, masks, maps), warmup=1, reps=args.reps)
    rows = [{"provider": "musc_fast", **case, **t_ours, **ours}]
    if not args.skip_baseline:
        ref = {}  # one timed call (minutes at full size) that also yields the values
        t_ref = measure(lambda: ref.update(baseline_metrics(labels, scores, masks, maps)), warmup=0, reps=1)
        diffs = {f"diff_{k}": abs(ours[k] - ref[k]) for k in METRIC_NAMES}
        rows.append({"provider": "baseline", **case, **t_ref, **ref})
        rows[0].update(speedup=t_ref["ms_p50"] / t_ours["ms_p50"], max_abs_diff=max(diffs.values()), **diffs)
    cols = ["provider", "n", "size", "ties", "ms_p20", "ms_p50", "ms_p80", *METRIC_NAMES]
    print_table(rows, cols)
    if not args.skip_baseline:
        print(f"speedup {rows[0]['speedup']:.1f}x, max |diff| over metrics {rows[0]['max_abs_diff']:.2e}")
        print_table([{k: rows[0][f"diff_{k}"] for k in METRIC_NAMES}])
    write_rows(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
