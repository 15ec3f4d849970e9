"""Tuning script for the offline preset: efficientnet_lite0 taps and image size under the MuSc math.

Not part of the package. It scores data sets with MuSc written out inline (so it does not depend on
the pipeline) and prints image/pixel AUROC per (image size, tapped layers), plus timings:

  per layer tokens [N, L, C] -> LayerNorm over (L, C) of each image (no affine, eps 1e-5)
  -> [N, C, G, G] -> avg_pool2d(r, stride 1, pad (r-1)//2, count_include_pad) for r in r_list
  -> L2-normalise over C -> a_ij(p) = min_q ||Z_i(p) - Z_j(q)|| for j != i
  -> score_i(p) = mean of the floor(0.3 (N-1)) smallest a_ij(p) -> mean over layers and r
  -> image score = max of the bilinear (align_corners=True) S x S map.

Data sets: ``bottle`` (../shared/datasets/mvtec_bottle, image labels only), ``mtd`` (a fixed 117-image
subset of ../shared/datasets/mtd with masks) and ``synth`` (skimage textures with smooth-noise blob
defects, generated here with a fixed seed: 3 textures x 40 images with masks).

  python bench/tune_offline_backbone.py --datasets bottle synth --sizes 224 256 --layer-sets 2,3,4 2,3,4,5
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from musc_fast.backbones import build_backbone

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# ------------------------------------------------------------------------------------------- data
def load_bottle():
    paths = sorted((SHARED / "datasets/mvtec_bottle/bottle/test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in paths])
    return [Image.open(p).convert("RGB") for p in paths], labels, None


def load_mtd():
    paths = sorted((SHARED / "datasets/mtd/magnetic_tile/test").glob("*/*.png"))
    good = [p for p in paths if p.parent.name == "good"][::4]
    bad = [p for p in paths if p.parent.name != "good"][::5]
    paths = good + bad
    masks = []
    for p in paths:
        mp = p.parents[2] / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        masks.append(Image.open(mp).convert("L") if p.parent.name != "good" else None)
    labels = np.array([p.parent.name != "good" for p in paths])
    return [Image.open(p).convert("RGB") for p in paths], labels, masks


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, zoom

    noise = zoom(gaussian_filter(rng.standard_normal((size // 16, size // 16)), 1.5), 16, order=1)
    cy, cx = rng.integers(size // 6, 5 * size // 6, 2)
    yy, xx = np.mgrid[:size, :size]
    rad = rng.uniform(size / 16, size / 7)
    env = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rad**2))
    return (noise / noise.std() * 0.5 + 2 * env) > 1.4


def load_synth(kind: str, n_good: int = 24, n_bad: int = 16, size: int = 256):
    """Random crops of one skimage texture; defects paste another texture through a smooth blob mask."""
    import skimage.data as d
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng({"brick": 0, "grass": 1, "gravel": 2}[kind])
    src = getattr(d, kind)().astype(np.float32)
    other = getattr(d, {"brick": "gravel", "grass": "brick", "gravel": "grass"}[kind])().astype(np.float32)
    imgs, labels, masks = [], [], []
    for i in range(n_good + n_bad):
        y, x = rng.integers(0, src.shape[0] - size, 2)
        im = src[y:y + size, x:x + size].copy()
        mask = None
        if i < n_bad:
            mask = _blob(size, rng)
            while mask.sum() < 50:
                mask = _blob(size, rng)
            y2, x2 = rng.integers(0, other.shape[0] - size, 2)
            tex = other[y2:y2 + size, x2:x2 + size]
            tex = (tex - tex.mean()) / tex.std() * im.std() + im.mean() + rng.choice([-40, 40])
            a = gaussian_filter(mask.astype(np.float32), 1)
            im = im * (1 - a) + tex * a
            mask = Image.fromarray((mask * 255).astype(np.uint8))
        imgs.append(Image.fromarray(im.clip(0, 255).astype(np.uint8)).convert("RGB"))
        labels.append(i < n_bad)
        masks.append(mask)
    return imgs, np.array(labels), masks


# ------------------------------------------------------------------------------------------- MuSc math
def preprocess(imgs, size, pre):
    interp = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[pre.interpolation]
    x = torch.stack([torch.from_numpy(np.array(im.resize((size, size), interp))) for im in imgs])
    x = x.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None]


def aggregate(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """tokens [N, L, C] -> Z [N, L, C]: LN over (L, C) per image, r x r box mean, L2 over C."""
    n, length, c = tokens.shape
    g = math.isqrt(length)
    t = F.layer_norm(tokens, (length, c), eps=1e-5).transpose(1, 2).reshape(n, c, g, g)
    if r > 1:
        t = F.avg_pool2d(t, r, 1, (r - 1) // 2, count_include_pad=True)
    return F.normalize(t.reshape(n, c, length).transpose(1, 2), dim=-1)


def mutual_scores(z: torch.Tensor) -> torch.Tensor:
    """Z [N, L, C] -> [N, L]: mean of the floor(0.3 (N-1)) smallest per-image nearest distances."""
    n, length, _ = z.shape
    k = int(0.3 * (n - 1))
    flat = z.reshape(n * length, -1)
    out = torch.empty(n, length)
    for i in range(n):
        best = (z[i] @ flat.T).view(length, n, length).amax(-1)  # [L, N] max cosine per other image
        d = (2 - 2 * best).clamp_min(0).sqrt()
        d = torch.cat([d[:, :i], d[:, i + 1:]], 1)
        out[i] = d.topk(k, dim=1, largest=False).values.mean(1)
    return out


def evaluate(maps, labels, masks, size):
    """maps [N, L] -> (image AUROC, pixel AUROC or nan)."""
    g = math.isqrt(maps.shape[1])
    up = F.interpolate(maps.reshape(-1, 1, g, g).double(), size=size, mode="bilinear", align_corners=True)
    up = up[:, 0]
    img_auc = roc_auc_score(labels, up.flatten(1).amax(1).numpy())
    if masks is None:
        return img_auc, float("nan")
    gt = np.stack([np.zeros((size, size), bool) if m is None
                   else np.array(m.resize((size, size), Image.NEAREST)) > 127 for m in masks])
    return img_auc, roc_auc_score(gt.reshape(-1), up.numpy().reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["bottle", "synth"], choices=["bottle", "mtd", "synth"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256])
    ap.add_argument("--layer-sets", nargs="+", default=["2,3,4"])
    ap.add_argument("--r-list", nargs="+", type=int, default=[1, 3, 5])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layer_sets = [tuple(int(x) for x in s.split(",")) for s in args.layer_sets]
    needed = tuple(sorted(set(itertools.chain(*layer_sets))))
    sets = []
    for name in args.datasets:
        if name == "synth":
            sets += [(f"synth-{k}", *load_synth(k)) for k in ("brick", "grass", "gravel")]
        else:
            sets.append((name, *{"bottle": load_bottle, "mtd": load_mtd}[name]()))
    print("dataset,N,S,G,layers,r_list,image_auroc,pixel_auroc,backbone_s,msm_s_per_pass")
    for size in args.sizes:
        bb = build_backbone("efficientnet_lite0", pretrained="imagenet", image_size=size, layers=needed)
        for name, imgs, labels, masks in sets:
            x = preprocess(imgs, size, bb.preprocess)
            t0 = time.perf_counter()
            with torch.inference_mode():
                outs = [bb(x[i:i + 16], need_cls=False).tokens for i in range(0, len(x), 16)]
            tokens = {layer: torch.cat([o[j] for o in outs]) for j, layer in enumerate(needed)}
            t_bb = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                maps = {(lay, r): mutual_scores(aggregate(tokens[lay], r))
                        for lay in needed for r in args.r_list}
            t_msm = (time.perf_counter() - t0) / len(maps)
            for ls in layer_sets:
                m = torch.stack([maps[(lay, r)] for lay in ls for r in args.r_list]).mean(0)
                img_auc, px_auc = evaluate(m, labels, masks, size)
                print(f"{name},{len(imgs)},{size},{bb.grid_size(size)},{'-'.join(map(str, ls))},"
                      f"{'-'.join(map(str, args.r_list))},{img_auc:.4f},{px_auc:.4f},{t_bb:.1f},{t_msm:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
