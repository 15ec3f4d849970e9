"""Mutual-scoring stage: one LNAMD + MSM pass per (layer, r) against one Gram block per layer for every r.

Providers (each sets MUSC_FAST_MSM and MUSC_FAST_LNAMD for both paths):
  torch   per_r: ops.lnamd_multi + ops.mutual_scores; one_gram: ops.boxgram's torch blocks.
  triton  per_r: the LNAMD + mutual-min + interval-mean kernels; one_gram: kernels/boxgram.py (Gram kernel,
          two filter kernels) + the interval-mean kernel. GPU only (the interpreter is far too slow).

Tokens come from a backbone (random weights; the cost does not depend on them) on real images, so the
similarity statistics are those of ViT tokens; ``--paper`` instead draws synthetic tokens at the paper
shape (N=200, G=37, C=1024, one layer) so that a GPU run needs no backbone. Reports ms of each path for the
whole stage (LNAMD included) and, on each per_r row, the one-Gram speed-up over it (same provider and
precision) and the max difference of the patch scores (mean over the layers and r) between the two paths.

    python bench/bench_boxgram.py                     # ViT-B-16, 224 px, N=48, layers 2 5 8 11, r 1 3 5
    python bench/bench_boxgram.py --quick             # smoke run
    python bench/bench_boxgram.py --paper --providers triton --precision bf16,fp32 --reps 1   # GPU
    python bench/bench_boxgram.py --backbone dinov2_vitl14 --image-size 518 --layers 5 11 17 23 --n 200
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_e2e import DEFAULT_IMAGES, pick_images  # noqa: E402
from bench.harness import measure, print_table, write_rows  # noqa: E402


@contextlib.contextmanager
def provider_env(provider: str):
    """MUSC_FAST_MSM and MUSC_FAST_LNAMD = ``provider`` while the block runs (the gate reads them per call)."""
    keys = ("MUSC_FAST_MSM", "MUSC_FAST_LNAMD")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: provider for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def paper_tokens(n: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """One layer of synthetic ViT-like tokens [N, 1369, 1024] fp16: a prototype per grid position shared
    by all images, per-image noise and per-channel offsets (drawn on the device, image by image)."""
    g = torch.Generator(device=device).manual_seed(seed)
    length, c = 37 * 37, 1024
    proto = 2.0 * torch.randn(length, c, generator=g, device=device) + torch.randn(c, generator=g, device=device)
    out = torch.empty(n, length, c, dtype=torch.float16, device=device)
    for i in range(n):
        out[i] = proto + torch.randn(length, c, generator=g, device=device)
    return [out]


def backbone_tokens(args) -> list[torch.Tensor]:
    from musc_fast import MuSc, MuScConfig

    torch.manual_seed(0)
    config = MuScConfig(backbone=args.backbone, pretrained=None, image_size=args.image_size,
                        layers=tuple(args.layers), device=args.device)
    model = MuSc(config, num_workers=0)
    paths, _ = pick_images(DEFAULT_IMAGES, args.n)
    pixels = model.preprocess(paths or torch.rand(args.n, 3, args.image_size, args.image_size), progress=False)
    tokens, _ = model.extract(pixels, progress=False, need_cls=False)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="ViT-B-16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 5, 8, 11])
    ap.add_argument("--r-list", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--n", type=int, default=None, help="images (default 48; --paper 200)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help="comma list of torch, triton (default: torch on CPU, "
                    "triton on CUDA)")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32, bf16 (rows run in this order)")
    ap.add_argument("--block-elems", type=int, default=None, help="one-Gram chunk knob (default the library's)")
    ap.add_argument("--paper", action="store_true", help="synthetic tokens, N=200, G=37, C=1024, one layer")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.image_size, args.reps = 8, 112, 1
    args.n = args.n or (200 if args.paper else 48)
    cuda = args.device.startswith("cuda")
    providers = (args.providers or ("triton" if cuda else "torch")).split(",")
    if "triton" in providers and not cuda:
        raise SystemExit("the triton provider needs --device cuda (the interpreter is only for tests)")

    from musc_fast.ops import lnamd_multi, mutual_scores
    from musc_fast.ops.boxgram import mutual_scores_multi
    from musc_fast.ops.lnamd import layer_norm_chw
    from musc_fast.ops.msm import DEFAULT_BLOCK_ELEMS

    tokens = paper_tokens(args.n, args.device) if args.paper else backbone_tokens(args)
    r_list = list(args.r_list)
    block_elems = args.block_elems or DEFAULT_BLOCK_ELEMS
    sync = "cuda" if cuda else None
    device_kind = args.device.split(":")[0]
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_boxgram_{device_kind}.csv"
    outputs: dict[str, torch.Tensor] = {}

    def per_r(precision: str) -> None:
        acc = 0
        for t in tokens:
            for z in lnamd_multi(t, r_list):
                acc = acc + mutual_scores(z, precision=precision)
        outputs["per_r"] = acc / (len(tokens) * len(r_list))

    def one_gram(precision: str) -> None:
        acc = 0
        for t in tokens:
            acc = acc + mutual_scores_multi(layer_norm_chw(t), r_list, precision=precision,
                                            block_elems=block_elems).sum(0)
        outputs["one_gram"] = acc / (len(tokens) * len(r_list))

    rows = []
    for provider in providers:
        for precision in args.precision.split(","):
            with provider_env(provider):
                # One-Gram first and each row written when measured: a timed-out GPU step keeps it. The
                # per_r row then carries the comparison (one-Gram speed-up, max patch-score difference).
                for name, fn in (("one_gram", one_gram), ("per_r", per_r)):
                    row = {"path": name, "provider": provider, "n": args.n, "L": tokens[0].shape[1],
                           "C": tokens[0].shape[2], "layers": len(tokens), "r_list": " ".join(map(str, r_list)),
                           "device": args.device, "precision": precision, "block_elems": block_elems,
                           **measure(lambda fn=fn, p=precision: fn(p), warmup=1, reps=args.reps, sync=sync)}
                    if name == "per_r":
                        row["one_gram_speedup"] = round(row["ms_p50"] / rows[-1]["ms_p50"], 2)
                        row["max_abs_patch_diff"] = float((outputs["per_r"] - outputs["one_gram"]).abs().max())
                    write_rows([row], out)
                    rows.append(row)
            outputs.clear()
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
