"""Backbone ms/image per runtime (torch eager, ONNX Runtime, OpenVINO), and `musc-fast run` on bottle per runtime.

    python bench/bench_runtime.py [--reps 3] [--no-e2e] [--no-vit] [--out bench/results/bench_runtime_cpu.csv]

Backbone rows: the offline backbone (efficientnet_lite0, real weights) at 256 px, batch 16, and ViT-B-16 at
224 px (random init), batch 4; ``speedup`` is torch eager ms / runtime ms in the same run, ``max_abs_diff`` the
largest |difference| of the tapped tokens and image token against torch on the same random batch.
E2E rows: `musc-fast run` on the bottle category (offline preset, 256 px) per runtime: ms/image per stage
and the metrics, ``max_score_diff`` against the torch run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.harness import measure, print_table, write_rows  # noqa: E402
from musc_fast.backbones import build_backbone  # noqa: E402
from musc_fast.runtimes import available_runtimes  # noqa: E402
from musc_fast.runtimes.runtime import RuntimeBackbone  # noqa: E402

CASES = {
    "efficientnet_lite0": dict(pretrained="imagenet", image_size=256, layers=(2, 3, 4), batch=16),
    "ViT-B-16": dict(pretrained=None, image_size=224, layers=(2, 5, 8, 11), batch=4),
}


def bench_backbone(name: str, case: dict, reps: int) -> list[dict]:
    model = build_backbone(name, pretrained=case["pretrained"], image_size=case["image_size"], layers=case["layers"])
    x = torch.randn(case["batch"], 3, case["image_size"], case["image_size"])
    with torch.inference_mode():
        ref = model(x)
    ref_all = ref.tokens + [ref.cls]

    def eager():
        with torch.inference_mode():
            model(x)

    rows = []
    t = measure(eager, warmup=1, reps=reps)
    base = t["ms_p50"] / case["batch"]
    rows.append(dict(kind="backbone", backbone=name, image_size=case["image_size"], batch=case["batch"],
                     runtime="torch", ms_per_image=round(base, 2), speedup=1.0, max_abs_diff=0.0))
    for rt in available_runtimes()[1:]:
        run = RuntimeBackbone(model, rt)
        out = run(x)
        diff = max(float((a - b).abs().max()) for a, b in zip(out.tokens + [out.cls], ref_all))
        t = measure(lambda run=run: run(x), warmup=1, reps=reps)
        ms = t["ms_p50"] / case["batch"]
        rows.append(dict(kind="backbone", backbone=name, image_size=case["image_size"], batch=case["batch"],
                         runtime=rt, ms_per_image=round(ms, 2), speedup=round(base / ms, 2),
                         max_abs_diff=f"{diff:.2e}"))
    return rows


def bench_e2e(data: Path) -> list[dict]:
    from musc_fast.cli import main

    rows, ref_scores = [], None
    for rt in available_runtimes():
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["run", "--dataset", "mvtec", "--data-path", str(data), "--category", "bottle", "--out", out,
                         "--preset", "offline", "--device", "cpu", "--no-progress", "--runtime", rt]) == 0
            cat = json.loads(next(Path(out).rglob("results.json")).read_text())["categories"]["bottle"]
            scores = {r["path"]: float(r["score"]) for r in csv.DictReader(open(next(Path(out).rglob("scores.csv"))))}
        ref_scores = ref_scores or scores
        t = cat["timings_ms_per_image"]
        m = cat["metrics"]
        rows.append(dict(kind="e2e", backbone="efficientnet_lite0", image_size=256, batch=16, runtime=rt,
                         ms_per_image=round(t["total"], 1), backbone_ms=round(t["backbone"], 1),
                         msm_ms=round(t["msm"], 1),
                         max_score_diff=f"{max(abs(scores[p] - ref_scores[p]) for p in scores):.2e}",
                         **{k: ("" if m.get(k) is None else round(m[k], 2))
                            for k in ("auroc_sp", "auroc_px", "aupro")}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-vit", action="store_true")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "mvtec_bottle"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_runtime_cpu.csv"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    os.environ.setdefault("MUSC_FAST_CACHE", tmp)  # a cold cache: the export is part of the first call
    rows = []
    for name, case in CASES.items():
        if name.startswith("ViT") and args.no_vit:
            continue
        rows += bench_backbone(name, case, args.reps)
    if not args.no_e2e and Path(args.data).exists():
        rows += bench_e2e(Path(args.data))
    keys = list(dict.fromkeys(k for r in rows for k in r))  # one header for both kinds of row
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    for r in rows:
        r["load_avg_1m"] = round(os.getloadavg()[0], 2)  # the machine is shared: the load at the end
    print_table(rows)
    write_rows(rows, args.out, append=False)


if __name__ == "__main__":
    main()
