"""One image against a bank: ``Bank.score`` (torch) vs the exported model in ONNX Runtime and OpenVINO.

    python bench/bench_deploy.py [--sizes 16 64 200] [--image-size 256] [--reps 10]
                                 [--out bench/results/bench_deploy_cpu.csv]

Banks of M good magnetic-tile images (``train/good`` then ``test/good``: 200 distinct files), offline
preset (EfficientNet-Lite0). Each timed call scores ONE defect image from its file, end to end: decode,
preprocess, backbone, LNAMD, MSM against the bank, maps (``Bank.score([path])`` on the torch side,
``Inferencer.predict(path)`` on the exported side). Rows: p50 / p90 ms over ``--reps`` calls after one
warm-up; the speed-up against torch decoding in-process (``num_workers=0``) in the same run (a row with
the default DataLoader workers, which start processes on every call, is shown for information); max
|delta| of the score and the map against ``Bank.score``; ``export_s`` is the time to export the folder,
``model_mb`` its size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make ``bench`` and ``musc_fast`` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.harness import print_table, write_rows  # noqa: E402
from musc_fast.bank import Bank  # noqa: E402
from musc_fast.config import MuScConfig  # noqa: E402
from musc_fast.deploy import Inferencer  # noqa: E402
from musc_fast.export import export_bank  # noqa: E402
from musc_fast.pipeline import MuSc  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "mtd" / "magnetic_tile"


def _times(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up (first-call allocations, OpenVINO/ORT lazy init)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    p50, p90 = np.quantile(ts, [0.5, 0.9])
    return float(p50), float(p90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 200])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--data", default=str(DATA), help="an MVTec-layout category with enough good images")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_deploy_cpu.csv"))
    args = ap.parse_args()

    root = Path(args.data)
    good = sorted(str(p) for p in (root / "train" / "good").glob("*.png"))
    good += sorted(str(p) for p in (root / "test" / "good").glob("*.png"))
    query = sorted(str(p) for p in (root / "test").rglob("*.png") if p.parent.name != "good")[0]
    if max(args.sizes) > len(good):
        raise SystemExit(f"{root}: {len(good)} good images, fewer than the largest bank ({max(args.sizes)})")
    cfg = MuScConfig.preset("offline", image_size=args.image_size, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.sizes:
            serial = MuSc(cfg, num_workers=0)  # decode in this process: no worker start-up per call
            bank = Bank.build(good[:m], model=serial, progress=False)
            ref = bank.score([query])
            t50, t90 = _times(lambda bank=bank: bank.score([query]), args.reps)
            base = dict(bank_images=m, image_size=args.image_size, query=Path(query).name,
                        load_avg_1m=round(os.getloadavg()[0], 2))  # a shared machine: how busy it was
            rows.append({**base, "engine": "Bank.score (torch, num_workers=0)", "ms_p50": round(t50, 1),
                         "ms_p90": round(t90, 1), "speedup": 1.0, "max_score_diff": 0.0, "max_map_diff": 0.0,
                         "export_s": "", "model_mb": ""})
            workers = MuSc(cfg)  # the default: DataLoader worker processes decode
            d50, d90 = _times(lambda bank=bank, w=workers: bank.score([query], model=w), 3)
            rows.append({**base, "engine": "Bank.score (torch, default loader workers)", "ms_p50": round(d50, 1),
                         "ms_p90": round(d90, 1), "speedup": round(t50 / d50, 2), "max_score_diff": "",
                         "max_map_diff": "", "export_s": "", "model_mb": ""})
            for fmt, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
                t0 = time.perf_counter()
                folder = export_bank(bank, Path(tmp) / f"{fmt}_{m}", fmt=fmt)
                export_s = time.perf_counter() - t0
                inf = Inferencer(folder, runtime=runtime)
                p = inf.predict(query)
                e50, e90 = _times(lambda inf=inf: inf.predict(query), args.reps)
                size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
                rows.append({**base, "engine": f"exported {fmt} on {runtime}", "ms_p50": round(e50, 1),
                             "ms_p90": round(e90, 1), "speedup": round(t50 / e50, 2),
                             "max_score_diff": f"{abs(p.score - ref.image_scores[0]):.2e}",
                             "max_map_diff": f"{float(np.abs(p.anomaly_map - ref.anomaly_maps[0]).max()):.2e}",
                             "export_s": round(export_s, 1), "model_mb": round(size, 1)})
            print_table(rows[-4:])
    print()
    print_table(rows)
    write_rows(rows, args.out, append=False)
    print(f"rows written to {args.out}")


if __name__ == "__main__":
    main()
