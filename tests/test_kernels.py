"""Triton kernel tests (tests/kernel_cases.py, tests/kernel_cases_boxgram.py): decides whether they can run
in this process.

The Triton interpreter is chosen when triton itself is imported (its standard library, tl.max, tl.sum,
is decorated then), so TRITON_INTERPRET=1 must be set before the first ``import triton`` of the process.
``import torch`` does not import triton, but ``torch._dynamo`` does, and torchvision, timm and open_clip
import that: any test module collected earlier that imports them has already loaded triton in compiled
mode. So:
  * CUDA and no TRITON_INTERPRET: the cases run here, compiled, on the GPU;
  * triton not imported yet: TRITON_INTERPRET=1 is set now (it stays set for the session; the gate's
    ``auto`` still picks torch for CPU tensors, so other tests are unaffected) and the cases run here;
  * triton already imported in compiled mode on a machine without CUDA: the cases run in one fresh
    subprocess with TRITON_INTERPRET=1 (one test below, which fails with the subprocess's report).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

_TRUE = ("1", "true", "on", "yes")
_COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0").lower() not in _TRUE
if not _COMPILED and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreter_ready() -> bool:
    """Was triton's standard library decorated for the interpreter (or is triton missing: the cases then
    skip themselves)?"""
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return True
    return isinstance(std.max, InterpretedFunction)


if _COMPILED or _interpreter_ready():
    from tests.kernel_cases import *  # noqa: F401,F403  (collected here)
    from tests.kernel_cases_boxgram import *  # noqa: F401,F403
else:

    def test_kernel_cases_in_interpreter_subprocess():
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(Path(__file__).relative_to(root))],
                             cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
        print(res.stdout.strip().splitlines()[-1])  # the subprocess's summary line, shown with -rA / -s
