"""Offline sm_90 (H200) build of every Triton launch the GPU tests and the paper benchmarks make, on a CPU.

Each launch is intercepted where the wrapper would start it (``musc_fast.kernels._sm90.preflight``:
Triton's own specialisation rules, so the variants built are the ones a GPU run compiles) and compiled
for sm_90 with the Triton that is imported; its registers, spill stack, local loads/stores and shared
memory (plus SASS counts: HGMMA = wgmma, LDGSTS = cp.async, FFMA) go to a CSV row the moment the build
finishes. The launches come from the wrappers themselves, so the list follows the kernels: the tests'
shapes (``_sm90.default_preflight_calls``) and the shapes of ``bench/gpu_check.sh`` (mutual min at N=200
and 1000, L=1369, C in 1024/1000/768, every precision the kernel module lists, and every autotune
candidate; interval mean; LNAMD; one-Gram kernels). SHFL (warp shuffles), BAR (barriers) and instrs are
static SASS counts per build; wgmma_inflight is the most wgmma groups left in flight at a wait. Large
inputs are meta tensors (no memory; the kernels never run).

Another Triton (the H200 image has 3.6.0, this machine 3.8):

    pip install --target /work/triton36 --no-deps triton==3.6.0
    python bench/preflight_sm90.py --triton-path /work/triton36       # -> results/preflight_sm90_triton3.6.0.csv
    python bench/preflight_sm90.py --wheel-dir /path/with/triton-whl  # unpacked into a temporary folder
    python bench/preflight_sm90.py --quick                            # the tests' launches only

Exit status 0 when every launch builds with no spills and no local memory, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H200_SMS = 132  # persistent grids are sized from the multiprocessor count: use the H200's


def use_triton(path: str | None, wheel_dir: str | None) -> str | None:
    """Put another Triton first on sys.path (before anything imports triton); returns the folder used."""
    if "triton" in sys.modules:
        raise RuntimeError("triton is already imported: choose the Triton before importing musc_fast.kernels")
    if wheel_dir:
        wheels = sorted(Path(wheel_dir).glob("triton-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"no triton-*.whl in {wheel_dir}")
        path = tempfile.mkdtemp(prefix="triton_wheel_")
        with zipfile.ZipFile(wheels[-1]) as zf:
            for info in zf.infolist():
                dst = zf.extract(info, path)
                mode = info.external_attr >> 16  # zip keeps the unix mode here; ptxas/cuobjdump need +x
                if mode & stat.S_IXUSR:
                    os.chmod(dst, mode & 0o777)
    if path:
        if not (Path(path) / "triton" / "__init__.py").is_file():
            raise FileNotFoundError(f"{path} holds no triton package (pip install --target {path} triton==X)")
        sys.path.insert(0, str(Path(path).resolve()))
    return path


def paper_calls():
    """(label, call) for the launches of bench/gpu_check.sh at the paper shape, beyond the tests' own."""
    import torch

    from musc_fast import kernels
    from musc_fast.kernels import mutual_min

    meta = dict(device="meta")
    calls = []
    precisions = sorted(mutual_min._PRECISIONS)  # every name the kernel module offers (tf32, fma, ...)
    for n in (200, 1000):
        for c in (1024, 1000, 768):
            for prec in precisions:
                calls.append((f"mutual_min N={n} L=1369 C={c} {prec}",
                              lambda n=n, c=c, prec=prec: kernels.nearest_similarity_triton(
                                  torch.zeros(n, 1369, c, **meta), precision=prec)))
    # Every autotune candidate (MUSC_FAST_AUTOTUNE=1 launches them on the real work) at the paper shape.
    for prec, cands in sorted(mutual_min.CANDIDATES.items()):
        for idx, cfg in enumerate(cands[1:], 1):
            for c in (1024, 1000):
                calls.append((f"mutual_min candidate {idx} N=200 L=1369 C={c} {prec}",
                              lambda c=c, prec=prec, cfg=cfg: kernels.nearest_similarity_triton(
                                  torch.zeros(200, 1369, c, **meta), precision=prec, config=cfg)))
    for n in (200, 1000):
        calls.append((f"interval_mean N={n} L=1369",
                      lambda n=n: kernels.interval_mean_triton(torch.zeros(n, 1369, n, **meta), 0,
                                                               (3 * (n - 1)) // 10)))
    for c in (1024, 1000, 768):
        for dtype, out in ((torch.float16, torch.float32), (torch.float16, torch.bfloat16),
                           (torch.float16, torch.float16)):
            calls.append((f"lnamd N=200 L=1369 C={c} {dtype} -> {out}",
                          lambda c=c, dtype=dtype, out=out: kernels.lnamd_triton(
                              torch.zeros(200, 1369, c, dtype=dtype, **meta), [1, 3, 5], out_dtype=out)))
    for c in (1024, 1000, 768):
        for prec in ("fp32", "bf16", "fp16"):
            calls.append((f"boxgram N=200 L=1369 C={c} {prec}",
                          lambda c=c, prec=prec: kernels.nearest_similarity_multi_triton(
                              torch.zeros(200, 1369, c, **meta), [1, 3, 5], precision=prec,
                              inv_norms=torch.ones(3, 200, 1369, device=meta.get("device")))))
    return calls


FIELDS = ("label", "kernel", "num_warps", "num_stages", "regs", "stack", "LDL", "STL", "shared", "HGMMA", "HMMA",
          "FFMA", "LDGSTS", "RED", "ATOM", "SHFL", "BAR", "instrs", "wgmma_inflight", "constexprs", "error")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton-path", help="folder holding another triton package (pip install --target)")
    ap.add_argument("--wheel-dir", help="folder holding a triton-*.whl to unpack and use")
    ap.add_argument("--quick", action="store_true", help="the tests' launches only (no paper shapes)")
    ap.add_argument("--only", default="", help="build only launches whose label contains this text")
    ap.add_argument("--out", help="CSV (default bench/results/preflight_sm90_triton<version>.csv)")
    ap.add_argument("--dry-run", action="store_true", help="import the chosen Triton and list the launches")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled builds, not the interpreter
    try:
        use_triton(args.triton_path, args.wheel_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"preflight_sm90: {exc}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import triton

    from bench.harness import write_rows
    from musc_fast.kernels import _common, _sm90

    for mod in [m for name, m in sys.modules.items() if name.startswith("musc_fast.kernels") and m]:
        if getattr(mod, "num_sms", None) is _common.num_sms:
            mod.num_sms = lambda device: H200_SMS

    tests = [(f"tests #{i}", call) for i, call in enumerate(_sm90.default_preflight_calls())]
    calls = tests + ([] if args.quick else paper_calls())
    calls = [(label, call) for label, call in calls if args.only in label]
    out = Path(args.out or REPO / "bench" / "results" / f"preflight_sm90_triton{triton.__version__}.csv")
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}; {len(calls)} wrapper calls; "
          f"rows -> {out}", flush=True)
    if args.dry_run:
        for label, _ in calls:
            print("  ", label)
        return 0
    if out.exists():
        out.unlink()
    bad, builds, t0 = 0, set(), time.perf_counter()
    for label, call in calls:
        try:
            reports = _sm90.preflight([call])
        except Exception as exc:  # a wrapper that cannot run on CPU/meta tensors: listed, not fatal
            reports = [{"kernel": "?", "error": f"wrapper: {type(exc).__name__}: {exc}"[:500]}]
        for rep in reports:
            row = {k: rep.get(k, "") for k in FIELDS}
            row.update(label=label, constexprs=" ".join(f"{k}={v}" for k, v in sorted(rep.get("constexprs",
                                                                                               {}).items())))
            failed = bool(rep.get("error")) or rep.get("stack", 0) or rep.get("LDL", 0) or rep.get("STL", 0)
            bad += bool(failed)
            builds.add((row["kernel"], row["constexprs"], row["num_warps"], row["num_stages"]))
            write_rows([row], out)
            print(f"{'FAIL' if failed else 'ok  '} {label:45s} {row['kernel']:22s} regs={row['regs']} "
                  f"stack={row['stack']} shared={row['shared']} HGMMA={row['HGMMA']} {row['error']}", flush=True)
    print(f"{len(builds)} distinct (kernel, constants, warps, stages) builds for sm_90 with triton "
          f"{triton.__version__} in {time.perf_counter() - t0:.0f} s: {bad} rows with an error, spills or local "
          f"memory; rows in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
