"""Mutual-scoring stage: one LNAMD + MSM pass per (layer, r) against one Gram block per layer for every r.

Tokens come from a backbone (random weights; the cost does not depend on them) on real images, so the
similarity statistics are those of ViT tokens. Reports ms of each path for the whole stage (LNAMD
included), the ratio, and the max difference of the patch scores (mean over the layers and r).

    python bench/bench_boxgram.py                     # ViT-B-16, 224 px, N=48, layers 2 5 8 11, r 1 3 5
    python bench/bench_boxgram.py --quick             # smoke run
    python bench/bench_boxgram.py --backbone dinov2_vitl14 --image-size 518 --layers 5 11 17 23 --n 200
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_e2e import DEFAULT_IMAGES, pick_images  # noqa: E402
from bench.harness import measure, print_table, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 5, 8, 11])
    ap.add_argument("--r-list", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.image_size, args.reps = 8, 112, 1

    from musc_fast import MuSc, MuScConfig
    from musc_fast.ops import lnamd_multi, mutual_scores
    from musc_fast.ops.boxgram import mutual_scores_multi
    from musc_fast.ops.lnamd import layer_norm_chw

    torch.manual_seed(0)
    config = MuScConfig(backbone=args.backbone, pretrained=None, image_size=args.image_size,
                        layers=tuple(args.layers), device=args.device)
    model = MuSc(config, num_workers=0)
    paths, _ = pick_images(DEFAULT_IMAGES, args.n)
    pixels = model.preprocess(paths or torch.rand(args.n, 3, args.image_size, args.image_size), progress=False)
    tokens, _ = model.extract(pixels, progress=False, need_cls=False)
    r_list = list(args.r_list)
    sync = "cuda" if args.device.startswith("cuda") else None

    def per_r() -> torch.Tensor:
        acc = 0
        for t in tokens:
            for z in lnamd_multi(t, r_list):
                acc = acc + mutual_scores(z, precision=args.precision)
        return acc / (len(tokens) * len(r_list))

    def one_gram() -> torch.Tensor:
        acc = 0
        for t in tokens:
            acc = acc + mutual_scores_multi(layer_norm_chw(t), r_list, precision=args.precision).sum(0)
        return acc / (len(tokens) * len(r_list))

    diff = float((per_r() - one_gram()).abs().max())
    rows = []
    for name, fn in (("per_r", per_r), ("one_gram", one_gram)):
        rows.append({"path": name, "n": args.n, "L": tokens[0].shape[1], "C": tokens[0].shape[2],
                     "layers": len(tokens), "r_list": " ".join(map(str, r_list)), "device": args.device,
                     "precision": args.precision, **measure(fn, warmup=1, reps=args.reps, sync=sync)})
    rows[1]["speedup_vs_per_r"] = round(rows[0]["ms_p50"] / rows[1]["ms_p50"], 2)
    rows[1]["max_abs_patch_diff"] = diff
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    device_kind = args.device.split(":")[0]
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_boxgram_{device_kind}.csv"
    write_rows(rows, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
