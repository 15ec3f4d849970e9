"""Hopper build (offline): every Triton kernel compiles for sm_90 at its GPU launch parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.triton
def test_kernels_build_for_sm90_without_spills():
    """Compile for sm_90 without a GPU (a subprocess, so the interpreter setting does not apply) and
    check what the H200 would run: wgmma for 16-bit MSM, a cp.async pipeline, red.max for the column
    maxima, no register spills anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, torch; from musc_fast.kernels import _sm90 as s; "
            "from musc_fast.kernels import nearest_similarity_triton as f; "
            "odd = s.preflight([lambda: f(torch.zeros(4, 1369, 1000), precision='bf16'), "
            "lambda: f(torch.zeros(4, 1369, 1000), precision='fp16'), "
            "lambda: f(torch.zeros(4, 1369, 100), precision='fp32'), "
            "lambda: f(torch.zeros(4, 1369, 100), precision='fp32-ieee')]); "
            "print(json.dumps({"
            "'bf16': s.mutual_min_report('bf16'), 'fp32': s.mutual_min_report('fp32'), "
            "'fp32_ieee': s.mutual_min_report('fp32-ieee'), "
            "**{f'odd_c_{i}': r for i, r in enumerate(odd)}, "
            "'interval': s.interval_mean_report(200), 'interval_n12': s.interval_mean_report(12), "
            "'interval_n9': s.interval_mean_report(9), 'lnamd': s.lnamd_report(1024), "
            "**{f'flat_{p}': s.mutual_min_report(p, c) for p, cs in __import__("
            "'musc_fast.kernels.mutual_min', fromlist=['x']).CANDIDATES.items() if p in ('bf16', 'fp32') "
            "for c in cs if c.flatten}, "
            "**{f'boxgram_{p}_{k}': v for p in ('bf16', 'fp32', 'fp32-ieee') "
            "for k, v in s.boxgram_report(p).items()}}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:
        if "cuobjdump" in res.stderr or "No such file" in res.stderr:
            pytest.skip(f"this Triton install cannot build sm_90 offline: {res.stderr[-300:]}")
        raise AssertionError(res.stderr[-3000:])
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    for name, r in rep.items():
        assert r["stack"] == 0 and r["LDL"] == 0 and r["STL"] == 0, (name, r)
        assert r["shared"] <= 227 * 1024, (name, r)
    assert rep["bf16"]["HGMMA"] > 0 and rep["bf16"]["LDGSTS"] > 0, rep["bf16"]
    # The flattened-loop candidates stay on wgmma + cp.async (checked spill-free above).
    assert rep["flat_bf16"]["HGMMA"] > 0 and rep["flat_bf16"]["LDGSTS"] > 0, rep["flat_bf16"]
    assert rep["flat_fp32"]["HGMMA"] >= 6, rep["flat_fp32"]
    # Exact mode on tensor cores (bf16 split: 6 products); fp32-ieee on the FMA units (TF32 really off).
    assert rep["fp32"]["HGMMA"] >= 6 and rep["fp32"]["LDGSTS"] > 0, rep["fp32"]
    assert rep["fp32_ieee"]["HGMMA"] == 0 and rep["fp32_ieee"]["FFMA"] > 0, rep["fp32_ieee"]
    # Column maxima through red.max; the only ATOMs are the work counter's (returns a value).
    assert rep["bf16"]["RED"] > 0 and rep["bf16"]["ATOM"] <= 2, rep["bf16"]
    # C not a multiple of 16/32 (zero-padded to the K block): 4 launches, spill-free (checked above) and
    # on the cp.async pipeline.
    odd = [r for k, r in rep.items() if k.startswith("odd_c_")]
    assert len(odd) == 4 and all("error" not in r and r["LDGSTS"] > 0 for r in odd), odd
    # One-Gram kernels (kernels/boxgram.py): the Gram on wgmma in bf16 and fp32 (split), FFMA in fp32-ieee;
    # every degree's maxima through red.max; the filters of r = 3 and 5 present and spill-free (above).
    box = {k[len("boxgram_"):]: r for k, r in rep.items() if k.startswith("boxgram_")}
    assert {"bf16_gram", "bf16_box_rows", "bf16_box_cols_r3", "bf16_box_cols_r5", "fp32_gram"} <= set(box)
    assert box["bf16_gram"]["HGMMA"] > 0 and box["bf16_gram"]["LDGSTS"] > 0, box["bf16_gram"]
    assert box["fp32_gram"]["HGMMA"] >= 6, box["fp32_gram"]  # exact mode: the bf16 split on wgmma
    assert box["fp32-ieee_gram"]["HGMMA"] == 0 and box["fp32-ieee_gram"]["FFMA"] > 0, box["fp32-ieee_gram"]
    for name in ("gram", "box_cols_r3", "box_cols_r5"):
        assert box[f"bf16_{name}"]["RED"] > 0 and box[f"bf16_{name}"]["ATOM"] == 0, (name, box[f"bf16_{name}"])
