"""The one-Gram box filters on the CPU, fused: one C kernel per group of 8 partner images.

The torch one-Gram blocks (``ops/boxgram.py``) filter each Gram block with ~25 full passes over it per r
(shifted adds, two scalings, two maxima), memory-bound on multi-MB blocks. This kernel takes the Gram
block of one query image against up to ``LANES`` = 8 partners (the 8 partners are the lanes of one
vector register) and streams it once per r: each query patch's slab [L, 8] is box-filtered over the
partner's grid in L1, the query-grid filter keeps a ring of ``r`` filtered grid rows (L2-sized), and every
finished slab is scaled and reduced to its row and column maxima at once. No filtered block is stored.

Built on first use with the system C compiler (``CC``, default ``cc``; ``-O3 -march=native``, no OpenMP,
no torch headers: about 1 s) into ``$MUSC_FAST_CACHE/native`` (default ``~/.cache/musc_fast/native``),
keyed by the source, the compiler and the flags; loaded with ctypes, which releases the GIL, so groups
run on ``torch.get_num_threads()`` Python threads. ``MUSC_FAST_NATIVE``: ``auto`` (default: use it
where it builds), ``1`` (must build: an error otherwise), ``0`` (never: the torch blocks).

Arithmetic: float32, the same sums as the torch blocks in another order (within fp32 rounding of
them); ``ops.boxgram.box_filter_gram`` is the readable reference.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import env_switch

LANES = 8  # partner images per kernel call: one 256-bit vector of float32

C_SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <string.h>
#define W 8
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int v8i __attribute__((vector_size(32), aligned(4)));

static inline v8 vmax(v8 a, v8 b) { v8i m = a > b; return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }

/* tg[p][q] (one vector per patch pair, lane t = partner t) <- gram[t][q][p]; lanes >= w are 0. In q, p
   order the w source rows advance together and the stores stay within L1-sized lines. */
static void transpose_group(const float *restrict gram, int L, int w, v8 *restrict tg) {
    size_t LL = (size_t)L * L;
    if (w == W) {  /* the common case: a constant lane count the compiler unrolls */
        for (int q = 0; q < L; q++)
            for (int p = 0; p < L; p++) {
                v8 v;
                for (int t = 0; t < W; t++) v[t] = gram[t * LL + (size_t)q * L + p];
                tg[(size_t)p * L + q] = v;
            }
        return;
    }
    for (int q = 0; q < L; q++)
        for (int p = 0; p < L; p++) {
            v8 v = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int t = 0; t < w; t++) v[t] = gram[t * LL + (size_t)q * L + p];
            tg[(size_t)p * L + q] = v;
        }
}

/* dst[o][k] = sum over 0 <= e < n, |e - k| <= h of src[o][e]; rows of `inner` vectors */
static void box_rows(const v8 *restrict src, v8 *restrict dst, int outer, int n, int inner, int h) {
    for (int o = 0; o < outer; o++) {
        const v8 *s = src + (size_t)o * n * inner;
        v8 *d = dst + (size_t)o * n * inner;
        for (int k = 0; k < n; k++) {
            int lo = k - h < 0 ? 0 : k - h, hi = k + h > n - 1 ? n - 1 : k + h;
            v8 *dk = d + (size_t)k * inner;
            const v8 *s0 = s + (size_t)lo * inner;
            for (int x = 0; x < inner; x++) dk[x] = s0[x];
            for (int e = lo + 1; e <= hi; e++) {
                const v8 *se = s + (size_t)e * inner;
                for (int x = 0; x < inner; x++) dk[x] += se[x];
            }
        }
    }
}

/* s = f * wp * csg per partner patch q: column maxima into cm, returns the row maxima (over q) */
static v8 scale_max(const v8 *restrict f, float wp, const v8 *restrict csg, v8 *restrict cm, int L) {
    v8 acc;
    for (int t = 0; t < W; t++) acc[t] = -INFINITY;
    for (int q = 0; q < L; q++) {
        v8 s = f[q] * wp * csg[q];
        acc = vmax(s, acc);
        cm[q] = vmax(s, cm[q]);
    }
    return acc;
}

size_t scratch_floats(int g, int rmax) {
    size_t L = (size_t)g * g;
    return W * (L * L + L * 5 + (size_t)g * L * (1 + (size_t)rmax));
}

/* gram [w][L][L] = <x_j(q), x_i(p)> (partner t, partner patch q, query patch p), L = g * g, w <= 8;
   rs [R][L] 1/||B_r x_i(p)||; cs [R][w][L] 1/||B_r x_j(q)||;
   rowmax, colmax [R][w][L]: max over q (resp. p) of s_r(p, q) = r^-4 (B_r G B_r^T)(p, q) rs(p) cs(q). */
void group_maxima(const float *gram, int g, int w, const int *rlist, int R, const float *rs, const float *cs,
                  float *rowmax, float *colmax, float *scratch) {
    int L = g * g;
    size_t S = (size_t)L, RW = (size_t)g * S;
    v8 *tg = (v8 *)scratch, *tmp = tg + S * S, *fs = tmp + S, *csg = fs + S, *cm = csg + S, *rm = cm + S;
    v8 *hq = rm + S, *ring = hq + RW;
    transpose_group(gram, L, w, tg);  /* slab of query patch p: tg + p * L */
    for (int k = 0; k < R; k++) {
        int r = rlist[k], h = (r - 1) / 2;
        float r4 = (float)r * (float)r * (float)r * (float)r;
        const float *rsk = rs + (size_t)k * L;
        for (int q = 0; q < L; q++) {
            v8 c = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int t = 0; t < w; t++) c[t] = cs[((size_t)k * w + t) * L + q] / r4;
            csg[q] = c;
            for (int t = 0; t < W; t++) cm[q][t] = -INFINITY;
        }
        if (r == 1) {
            for (int p = 0; p < L; p++) rm[p] = scale_max(tg + (size_t)p * S, rsk[p], csg, cm, L);
        } else {
            /* grid row ap of the query: its g slabs filtered over the partner grid (q col, q row), then
               over the query grid's columns, into ring slot ap % r; row a is finished once row a + h is in */
            for (int a = -h; a < g; a++) {
                int ap = a + h;
                if (ap < g) {
                    for (int b = 0; b < g; b++) {
                        box_rows(tg + (size_t)(ap * g + b) * S, tmp, g, g, 1, h);
                        box_rows(tmp, hq + (size_t)b * S, 1, g, g, h);
                    }
                    box_rows(hq, ring + (size_t)(ap % r) * RW, 1, g, (int)S, h);
                }
                if (a < 0) continue;
                int lo = a - h < 0 ? 0 : a - h, hi = a + h > g - 1 ? g - 1 : a + h;
                for (int b = 0; b < g; b++) {
                    const v8 *s0 = ring + (size_t)(lo % r) * RW + (size_t)b * S;
                    for (size_t x = 0; x < S; x++) fs[x] = s0[x];
                    for (int e = lo + 1; e <= hi; e++) {
                        const v8 *se = ring + (size_t)(e % r) * RW + (size_t)b * S;
                        for (size_t x = 0; x < S; x++) fs[x] += se[x];
                    }
                    rm[a * g + b] = scale_max(fs, rsk[a * g + b], csg, cm, L);
                }
            }
        }
        for (int p = 0; p < L; p++)
            for (int t = 0; t < w; t++) {
                rowmax[((size_t)k * w + t) * L + p] = rm[p][t];
                colmax[((size_t)k * w + t) * L + p] = cm[p][t];
            }
    }
}
"""

_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99")
_FALLBACK_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")  # compilers without -march=native


def native_mode() -> str:
    """``MUSC_FAST_NATIVE``: ``auto`` (default), ``on`` (``1``) or ``off`` (``0``)."""
    return env_switch("MUSC_FAST_NATIVE")


def cache_folder() -> Path:
    base = os.environ.get("MUSC_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "musc_fast")
    return Path(base) / "native"


def _compile(cc: list[str], flags: tuple[str, ...]) -> Path:
    """Build the library (once per source, compiler and flags) and return its path; raises RuntimeError
    with the compiler's first error line."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([C_SOURCE, " ".join(cc), version, *flags]).encode()).hexdigest()[:20]
    folder = cache_folder()
    lib = folder / f"boxgram_cpu_{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "boxgram_cpu.c", Path(tmp) / "lib.so"
        src.write_text(C_SOURCE)
        done = subprocess.run([*cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
            raise RuntimeError(f"{' '.join(cc)} failed: {first[:300]}")
        os.replace(out, lib)  # atomic: concurrent builds of the same key end with one complete file
    return lib


@functools.lru_cache(maxsize=None)
def _load(cc_env: str) -> tuple[ctypes.CDLL | None, str]:
    cc = shlex.split(cc_env) or ["cc"]
    errors = []
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        try:
            lib = ctypes.CDLL(str(_compile(cc, flags)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            continue
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.group_maxima.argtypes = [p, i, i, p, i, p, p, p, p, p]
        lib.group_maxima.restype = None
        lib.scratch_floats.argtypes = [i, i]
        lib.scratch_floats.restype = ctypes.c_size_t
        return lib, f"built with {' '.join(cc)} {' '.join(f for f in flags if f.startswith(('-O', '-m')))}"
    return None, f"no C compiler could build it ({errors[-1]})"


def available() -> tuple[bool, str]:
    """(can the fused CPU kernel run here, why / why not). Builds it on the first call."""
    if native_mode() == "off":
        return False, "MUSC_FAST_NATIVE=0"
    lib, why = _load(os.environ.get("CC", "cc"))
    if lib is None and native_mode() == "on":
        raise RuntimeError(f"MUSC_FAST_NATIVE=1 but the native one-Gram kernel is unavailable: {why}")
    return lib is not None, why


class _Workers(threading.local):
    """One scratch buffer per thread (the ring of filtered grid rows: ~R * g * L * 32 bytes)."""

    scratch: torch.Tensor | None = None


_local = _Workers()


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="musc-native")


def _run_group(lib, job, g: int, rlist: torch.Tensor, rs: torch.Tensor) -> None:
    gram, cs, rowmax, colmax = job
    need = int(lib.scratch_floats(g, int(rlist.max())))
    if _local.scratch is None or _local.scratch.numel() < need:
        _local.scratch = torch.empty(need, dtype=torch.float32)
    lib.group_maxima(gram.data_ptr(), g, gram.shape[0], rlist.data_ptr(), rlist.numel(), rs.data_ptr(),
                     cs.data_ptr(), rowmax.data_ptr(), colmax.data_ptr(), _local.scratch.data_ptr())


def group_maxima(grams: list[torch.Tensor], g: int, r_list, rs: torch.Tensor,
                 cs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row and column maxima of every r for groups of up to 8 partners of one query image.

    Args:
        grams: per group, [w, L, L] float32 contiguous, ``gram[t, q, p] = <x_j(q), x_i(p)>`` for the
            group's partner t (w <= ``LANES``), L = g * g.
        rs: [R, L] float32, 1 / ||B_r x_i(p)|| of the query image. cs: per group, [R, w, L] float32,
            1 / ||B_r x_j(q)|| of its partners.
    Returns:
        per group (rowmax, colmax), each [R, w, L] float32: ``rowmax[k, t, p] = max_q s_r(p, q)`` (the
        query's patches against partner t), ``colmax[k, t, q] = max_p s_r(p, q)``.
    """
    lib, why = _load(os.environ.get("CC", "cc"))
    if lib is None:
        raise RuntimeError(f"the native one-Gram kernel is unavailable: {why}")
    rlist = torch.tensor([int(r) for r in r_list], dtype=torch.int32)
    rs = rs.contiguous()
    jobs = []
    for gram, c in zip(grams, cs):
        w = gram.shape[0]
        if not (1 <= w <= LANES and gram.shape[1:] == (g * g, g * g) and gram.is_contiguous()
                and gram.dtype == torch.float32 and c.shape == (len(rlist), w, g * g)):
            raise ValueError(f"group_maxima: bad group gram {tuple(gram.shape)} / scales {tuple(c.shape)}")
        out = torch.empty((2, len(rlist), w, g * g), dtype=torch.float32)
        jobs.append((gram, c.contiguous(), out[0], out[1]))
    threads = max(1, min(torch.get_num_threads(), len(jobs)))
    if threads == 1:
        for job in jobs:
            _run_group(lib, job, g, rlist, rs)
    else:
        list(_pool(threads).map(lambda job: _run_group(lib, job, g, rlist, rs), jobs))
    return [(rowmax, colmax) for _, _, rowmax, colmax in jobs]
