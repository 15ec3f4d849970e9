"""Compile the kernels for Hopper (sm_90) on a machine without a GPU and report what the compiler made.

Triton compiles to a cubin for a named target without touching a driver, and its wheel carries
``cuobjdump``. This gives a CPU-only check that every kernel builds for the H200 at its real launch
parameters, and shows registers, spills (stack frame, LDL/STL), shared memory, whether the matmul runs on
the Hopper tensor-core path (HGMMA = wgmma) and whether the column maxima use fire-and-forget
reductions (RED). Used by tests/test_kernel_build.py and by hand (``python -m musc_fast.kernels._sm90``).

Integer arguments that a real launch would see as multiples of 16 (Triton specialises those) must be
listed in ``divisible``, or the compiler cannot prove 16-byte alignment and skips the cp.async pipeline.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# SASS opcodes counted, by family (REDG/ATOMG are the global-memory forms on sm_90).
_COUNTED = {"HGMMA": ("HGMMA",), "HMMA": ("HMMA",), "FFMA": ("FFMA",), "LDL": ("LDL",), "STL": ("STL",),
            "RED": ("RED", "REDG"), "ATOM": ("ATOM", "ATOMG"), "LDGSTS": ("LDGSTS",),
            "SHFL": ("SHFL",), "BAR": ("BAR", "BAR.SYNC"), "WARPSYNC": ("WARPSYNC",)}


def compile_kernel(fn, signature: dict, constexprs: dict, divisible: tuple[str, ...] = (), *,
                   num_warps: int = 4, num_stages: int = 3, capability: int = 90) -> dict:
    """Compile ``fn`` (a triton.jit function) for CUDA ``capability`` and summarise the cubin.

    Returns:
        dict with ``shared`` (bytes), ``regs``, ``stack`` (spill bytes per thread), static SASS opcode counts
        (``_COUNTED``: SHFL = warp shuffles, BAR = barriers) and ``instrs`` (all static SASS instructions).
    """
    if hasattr(fn, "fn") and not hasattr(fn, "arg_names"):  # an interpreter-mode wrapper
        raise RuntimeError("compile_kernel needs the compiled (non-interpreter) kernel")
    sig = {k: ("constexpr" if k in constexprs else v) for k, v in signature.items()}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    report = {"shared": kernel.metadata.shared, "regs": field("REG"), "stack": field("STACK")}
    # An optional guard predicate (@P0, @!P1, @UPT ...) precedes masked loads, stores and reductions.
    opcodes = [o.split(".")[0] for o in
               re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)]
    report.update({op: sum(o in _COUNTED[op] for o in opcodes) for op in _COUNTED})
    # Static SASS size (padding NOPs after the final EXIT/BRA excluded): not a run-time count, but the
    # before/after of a restructure shows in it (e.g. the epilogue's shuffles and barriers).
    report["instrs"] = sum(o != "NOP" for o in opcodes)
    # wgmma groups left in flight at the waits (WARPGROUP.DEPBAR.LE gsb0, N): 0 = each K step's products
    # are waited for before the next loads are issued, 1 = one group overlaps the next step's issue.
    report["wgmma_inflight"] = max((int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)",
                                                                   sass)), default=0)
    return report


def mutual_min_report(precision: str, config=None, flatten: bool | None = None) -> dict:
    """sm_90 build of the mutual-min kernel at its GPU default config (C padded to BLOCK_K, as the wrapper);
    ``flatten`` overrides the config's loop form (True: one pipelined loop over column tiles and K)."""
    from . import mutual_min as mm

    cfg = config or mm._DEFAULTS[precision]
    dtype = mm._OPERAND_DTYPE[precision]
    ptr = "*bf16" if dtype == torch_dtype("bfloat16") else "*fp16" if dtype == torch_dtype("float16") else "*fp32"
    sig = {"z_ptr": ptr, "sim_ptr": "*fp32", "pair_i_ptr": "*i32", "pair_j_ptr": "*i32", "counter_ptr": "*i32",
           "n_img": "i32", "length": "i32", "chans": "i32", "n_pairs": "i32", "n_items": "i32",
           "split_stride": "i32", "BLOCK_M": "", "BLOCK_N": "", "BLOCK_K": "", "INPUT_PRECISION": "",
           "UPCAST": "", "SPLIT": "", "FLATTEN": ""}
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "INPUT_PRECISION": mm._PRECISIONS[precision], "UPCAST": False, "SPLIT": mm._SPLIT.get(precision, 1),
              "FLATTEN": cfg.flatten if flatten is None else flatten}
    return compile_kernel(mm._mutual_min_kernel, sig, consts,
                          ("z_ptr", "sim_ptr", "pair_i_ptr", "pair_j_ptr", "chans", "split_stride"),
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def interval_mean_report(n_img: int = 200) -> dict:
    """sm_90 build of the interval-mean kernel with the block sizes the wrapper picks for N images."""
    from . import interval_mean as im

    block_r, block_c, warps = im.launch_shape(n_img, interpret=False)
    sig = {"sim_ptr": "*fp32", "out_ptr": "*fp64", "n_rows": "i32", "n_cols": "i32", "n_pass": "i32",
           "pass_stride": "i64", "k_min": "i32", "k_max": "i32", "width": "fp32", "ACCUMULATE": "",
           "BLOCK_R": "", "BLOCK_C": ""}
    return compile_kernel(im._interval_mean_kernel, sig,
                          {"ACCUMULATE": True, "BLOCK_R": block_r, "BLOCK_C": block_c},
                          ("sim_ptr", "out_ptr"), num_warps=warps)


def lnamd_report(chans: int = 1024, r_list=(1, 3, 5), token_dtype: str = "fp16") -> dict:
    """sm_90 build of the LNAMD box kernel (the one with registers at stake) for C channels."""
    from . import lnamd as ln

    rs = list(r_list) + [0] * (ln.MAX_R_PER_LAUNCH - len(r_list))
    block_p, block_c, warps = ln.launch_shape(chans, interpret=False)
    sig = {"x_ptr": f"*{token_dtype}", "part_ptr": "*fp64", "out0_ptr": "*fp32", "out1_ptr": "*fp32",
           "out2_ptr": "*fp32", "out3_ptr": "*fp32", "length": "i32", "chans": "i32", "grid_g": "i32",
           "NUM_CHUNKS": "", "R0": "", "R1": "", "R2": "", "R3": "", "HALF": "", "BLOCK_P": "", "BLOCK_C": ""}
    consts = {"NUM_CHUNKS": 64, "R0": rs[0], "R1": rs[1], "R2": rs[2], "R3": rs[3],
              "HALF": (max(r_list) - 1) // 2, "BLOCK_P": block_p, "BLOCK_C": block_c}
    return compile_kernel(ln._lnamd_box_kernel, sig, consts,
                          ("x_ptr", "part_ptr", "out0_ptr", "out1_ptr", "out2_ptr", "out3_ptr", "chans"),
                          num_warps=warps)


def boxgram_report(precision: str, chans: int = 1024, r_list=(1, 3, 5)) -> dict:
    """sm_90 builds of the one-Gram kernels (kernels/boxgram.py) as a paper-grid launch specialises them
    (L=1369, C channels, GPU default config): {"gram", "box_rows", "box_cols_r<R>" per R > 1: report}."""
    import torch

    from . import boxgram

    reports = preflight([lambda: boxgram.nearest_similarity_multi_triton(
        torch.zeros(2, 1369, chans), r_list, inv_norms=torch.ones(len(r_list), 2, 1369), precision=precision)])
    names = {"_gram_kernel": "gram", "_box_rows_kernel": "box_rows"}
    return {names.get(r["kernel"], f"box_cols_r{r['constexprs'].get('R')}"): r for r in reports}


def preflight(calls) -> list[dict]:
    """Run wrapper calls with every Triton launch replaced by an sm_90 build of exactly that launch.

    Each ``launch`` is specialised as a real one would be (Triton's own rules: integers equal to 1 become
    constants, 16-divisible integers and aligned pointers get divisibility hints), so this compiles the
    variants a GPU run of the same calls will compile, on a machine without a GPU. Kernel outputs are not
    computed. Must run without TRITON_INTERPRET.

    Args:
        calls: callables that call the public wrappers (CPU tensors are fine).
    Returns:
        one report per distinct specialisation: kernel name, its constants, and ``compile_kernel``'s fields
        (or ``error``).
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction

    from . import _common, boxgram, interval_mean, lnamd, mutual_min

    seen: dict[tuple, dict] = {}

    def fake_getitem(self, grid):
        def launch(*args, **kwargs):
            opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = dict(zip(self.arg_names, args), **kwargs)
            sig, consts, divisible = {}, {}, []
            for param in self.params:
                value = bound[param.name]
                if param.is_constexpr:
                    consts[param.name] = value
                    continue
                kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
                if kind == "constexpr":
                    consts[param.name] = attr
                else:
                    sig[param.name] = kind
                    if attr == "D":
                        divisible.append(param.name)
            sig.update({k: "constexpr" for k in consts})
            key = (self.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
                   tuple(divisible), tuple(sorted(opts.items())))
            if key not in seen:
                try:
                    rep = compile_kernel(self, sig, consts, tuple(divisible), **opts)
                except Exception as exc:  # report, don't stop: the point is to list every failure
                    rep = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                seen[key] = {"kernel": self.__name__, "constexprs": consts, **opts, **rep}
        return launch

    saved = JITFunction.__getitem__
    no_check = lambda *tensors: None  # noqa: E731  (CPU tensors stand in for CUDA ones)
    modules = (_common, boxgram, interval_mean, lnamd, mutual_min)
    checks = [m.check_device for m in modules]
    JITFunction.__getitem__ = fake_getitem
    for m in modules:
        m.check_device = no_check
    try:
        for call in calls:
            call()
    finally:
        JITFunction.__getitem__ = saved
        for m, chk in zip(modules, checks):
            m.check_device = chk
    return list(seen.values())


def default_preflight_calls():
    """The launches of the kernel tests (GPU-compiled run) and of the paper-shape benchmarks."""
    import torch

    from . import interval_mean_triton, lnamd_triton, nearest_similarity_multi_triton, nearest_similarity_triton
    from .boxgram import BoxGramConfig
    from .mutual_min import MutualMinConfig

    small = MutualMinConfig(16, 32, 16, num_stages=2)  # tests/test_msm.SMALL
    calls = []
    for n, length, c, cfg, precs in [
        (2, 49, 24, None, ("fp32",)), (5, 49, 37, small, ("fp32", "bf16", "fp16")),
        (3, 16, 16, None, ("fp32",)), (4, 9, 64, small, ("fp32",)),
        (12, 1369, 1024, None, ("fp32", "bf16", "tf32", "fp16")), (7, 1369, 24, None, ("fp32",)),
        (200, 1369, 1024, None, ("fp32", "bf16", "fp32-ieee")), (4, 1369, 1000, None, ("bf16", "fp16", "fp32")),
        (4, 1369, 100, None, ("fp32", "fp32-ieee")),
    ]:
        for prec in precs:
            calls.append(lambda n=n, length=length, c=c, cfg=cfg, prec=prec: nearest_similarity_triton(
                torch.zeros(n, length, c), precision=prec, config=cfg))
    calls.append(lambda: nearest_similarity_triton(torch.zeros(3, 4, 25, 24), config=small))
    for n, k_min, k_max in [(2, 0, 1), (3, 0, 1), (7, 2, 4), (12, 0, 3), (200, 0, 59), (1000, 0, 299)]:
        calls.append(lambda n=n, a=k_min, b=k_max: interval_mean_triton(torch.zeros(n, 9, n), a, b))
    calls.append(lambda: interval_mean_triton(torch.zeros(3, 6, 16, 6), 1, 3,
                                              out=torch.zeros(6, 16), accumulate=True))
    # The pipeline's form (several passes summed into a float64 running sum) at every BLOCK_C up to N=1000:
    # ACCUMULATE changes the register allocation (the 8-byte stack of a 64 x 16 block showed only there).
    for n in (3, 5, 9, 12, 17, 24, 33, 48, 65, 100, 129, 200, 257, 513, 1000):
        calls.append(lambda n=n: interval_mean_triton(
            torch.zeros(12, n, 9, n, device="meta"), 0, max(1, (3 * (n - 1)) // 10),
            out=torch.zeros(n, 9, dtype=torch.float64, device="meta"), accumulate=True))
    for shape, r_list, dtype, out_dtype, bp in [
        ((2, 49, 24), [1, 3, 5], torch.float32, torch.float32, None),
        ((3, 25, 37), [7], torch.float32, torch.float32, None),
        ((2, 9, 64), [5, 1, 3, 1], torch.float32, torch.float32, None),
        ((1, 196, 33), [1, 3, 5, 7, 9], torch.float32, torch.float32, None),
        ((1, 36, 24), [1, 3, 5], torch.float32, torch.float32, 1),
        ((3, 49, 40), [3], torch.bfloat16, torch.bfloat16, None),
        ((3, 49, 40), [3], torch.float16, torch.float16, None),
        ((4, 1369, 1024), [1, 3, 5], torch.float16, torch.float32, None),
        ((200, 1369, 1024), [1, 3, 5], torch.float16, torch.bfloat16, None),
    ]:
        calls.append(lambda shape=shape, r_list=r_list, dtype=dtype, o=out_dtype, bp=bp: lnamd_triton(
            torch.zeros(shape, dtype=dtype), r_list, out_dtype=o, block_p=bp))
    small_box = BoxGramConfig(16, 32, 16, rows_p=16, rows_q=32, cols_p=32, cols_q=16)
    for n, length, c, r_list, cfg, precs in [
        (2, 25, 24, (1, 3, 5), None, ("fp32",)), (3, 49, 37, (1, 3, 5), None, ("fp32", "bf16", "fp16")),
        (5, 81, 20, (5, 1, 3, 1), None, ("fp32",)), (4, 25, 16, (3, 7), None, ("fp32",)),
        (3, 49, 37, (1, 3, 5), small_box, ("fp32",)), (6, 49, 24, (1, 3, 5), None, ("fp32",)),
        (4, 1369, 1024, (1, 3, 5), None, ("fp32", "bf16", "fp16")), (4, 1369, 768, (1, 3, 5), None, ("fp32",)),
    ]:
        for prec in precs:
            calls.append(lambda n=n, length=length, c=c, r_list=r_list, cfg=cfg, prec=prec:
                         nearest_similarity_multi_triton(torch.zeros(n, length, c), r_list, precision=prec,
                                                         inv_norms=torch.ones(len(r_list), n, length),
                                                         config=cfg))
    return calls


if __name__ == "__main__":
    import sys

    if "--preflight" in sys.argv:
        reports = preflight(default_preflight_calls())
        errors = sum("error" in r for r in reports)
        spills = sum(r.get("stack", 0) > 16 for r in reports)  # a few bytes of stack is noise
        minor = sum(0 < r.get("stack", 0) <= 16 for r in reports)
        for rep in reports:
            print(rep)
        print(f"{len(reports)} distinct launches built for sm_90: {errors} errors, {spills} with spills, "
              f"{minor} with <= 16 bytes of stack")
        raise SystemExit(1 if errors or spills else 0)

    for prec in ("bf16", "fp16", "tf32", "fp32"):
        print("mutual_min", prec, mutual_min_report(prec))
    print("interval_mean N=200", interval_mean_report(200))
    print("interval_mean N=1000", interval_mean_report(1000))
    print("lnamd C=1024", lnamd_report(1024))
    print("lnamd C=768", lnamd_report(768))
    for prec in ("bf16", "fp32"):
        for name, rep in boxgram_report(prec).items():
            print("boxgram", prec, name, rep)
