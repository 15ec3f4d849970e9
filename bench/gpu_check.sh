#!/usr/bin/env bash
# One prepared GPU check for an H200 lease, sized for ONE device call: every step's timeout is clipped
# to a wall budget of 540 s (GPU_CHECK_BUDGET_S) counted from the start, so the script ends inside the
# tool's 600 s limit whatever hangs. Run from the repository root:
#
#     bash bench/gpu_check.sh             # on the GPU machine (needs torch + triton + pytest + timm there)
#     bash bench/gpu_check.sh --dry-run   # here, on CPU: every step's command line and imports checked
#
# Files under $OUT (the device tool's output folder; bench/results/gpu_check when unset), at most 8:
#   gpu_check.log          all output, step by step, with a summary table at the end
#   bench_msm_cuda.csv     roofline, per-provider MSM passes at N=200 and N=1000, interval mean alone,
#                          bitwise repeat of the kernel passes (each row written as it finishes)
#   bench_e2e_cuda.csv     the e2e ladder at N=200 (ViT-L/14 through timm, random weights, 518 px)
#   kernels_gpu.xml, kernels_compiled.xml   junit per test run
#   logs.tar.gz            env/clock report and one log per step
# Providers the image lacks (faiss, open_clip) are skipped by the scripts with a logged reason.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's musc_fast, installed or not
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT/steps"
LOG="$OUT/gpu_check.log"
: > "$LOG"
SUMMARY=()
FAILED=0
PLANNED=0
if [ "$DRY" = 0 ]; then
    unset TRITON_INTERPRET         # compiled kernels, CUDA tensors
fi
export MUSC_FAST_AUTOTUNE=0        # fixed default configs: results do not depend on timing noise
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"   # compile the ~60 kernel variants in parallel

dry_command() {  # the CPU check that stands for a step's command in --dry-run
    local args=("$@")
    case "${args[*]}" in
        *"-m pytest"*)
            local keep=()
            for a in "${args[@]}"; do case "$a" in --junitxml=*|-n|8) ;; *) keep+=("$a") ;; esac; done
            "${keep[@]}" --collect-only -q ;;
        *bench/*.py*) "$@" --dry-run ;;
        bash\ -c*) bash -n -c "${args[2]}" && echo "syntax ok, would run: ${args[*]}" ;;
        *) echo "would run: ${args[*]}" ;;
    esac
}

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout clipped to the budget, log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    PLANNED=$((PLANNED + limit))
    local left=$((BUDGET - SECONDS - 10))   # 10 s kept for the bundle at the end
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "===== [$name] SKIPPED: wall budget of ${BUDGET}s spent" | tee -a "$LOG"
        SUMMARY+=("$(printf '%-22s skipped (budget)' "$name")")
        FAILED=$((FAILED + 1))
        return 0
    fi
    echo "===== [$name] timeout ${limit}s: $*" | tee -a "$LOG"
    local t0=$SECONDS rc
    if [ "$DRY" = 1 ]; then
        dry_command "$@" > "$OUT/steps/$name.log" 2>&1
        rc=$?
        tail -3 "$OUT/steps/$name.log" | tee -a "$LOG"
    else
        timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/steps/$name.log" | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
    fi
    local dt=$((SECONDS - t0))
    [ "$rc" -eq 124 ] && echo "===== [$name] TIMED OUT after ${limit}s" | tee -a "$LOG"
    echo "===== [$name] rc=$rc ${dt}s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-22s rc=%-4s %4ss' "$name" "$rc" "$dt")")
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    return 0
}

# the Triton kernel tests (the triton-marked tests of the op files; gpu-marked ones add the large shapes)
KERNEL_TESTS="tests/test_msm.py tests/test_lnamd.py tests/test_interval.py tests/test_boxgram.py tests/test_kernel_build.py"

if [ "$DRY" = 1 ]; then  # every module the steps import, and the files they read
    step imports 30 "$PY" -c "
import importlib.util, os, sys
sys.path.insert(0, os.getcwd())
import bench.harness, bench.bench_msm, bench.original_style, musc_fast, musc_fast.backbones, pytest, timm
for f in '$KERNEL_TESTS'.split() + ['bench/bench_e2e.py']:
    assert os.path.isfile(f), f
if importlib.util.find_spec('triton'):
    import musc_fast.kernels.mutual_min, musc_fast.kernels.interval_mean, musc_fast.kernels.lnamd
    print('triton kernels import')
else:
    print('triton absent here: kernel modules not imported')
assert 'dinov2_vitl14' in musc_fast.backbones.available()
print('imports ok')"
    PLANNED=$((PLANNED - 30))  # not a step of the real run
fi

MSM="$PY bench/bench_msm.py --paper --reps 3 --out $OUT/bench_msm_cuda.csv"
LADDER=(--backbone dinov2_vitl14 --image-size 518 --layers 5 11 17 23 --n 200 --batch-size 32 --images ""
        --device cuda --out "$OUT/bench_e2e_cuda.csv")

# 0. The machine, clocks and versions (also proves CUDA + triton import).
step env 20 bash -c "nvidia-smi; nvidia-smi -q -d CLOCK; $PY -c 'import sys, torch, triton, timm; print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"timm\", timm.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")'"

# 1. MSM at the paper shape, N=200: the torch.mm roofline (per-pair [L, C] x [C, L] and 8L blocks), the
#    original loop (1 rep), torch fp32/fp16/bf16, triton fp32 (exact)/fp16/bf16, the IEEE-FMA kernel
#    (found at run time; skipped with a reason if absent), a bitwise repeat of each kernel pass, and the
#    interval-mean kernel alone.
step msm-n200 90 $MSM --providers original,torch,triton,triton_fma,interval_mean --precision fp32,fp16,bf16 \
    --original-reps 1 --repeat-check --roofline

# 2. Correctness at large shapes on the GPU.
step tests-gpu 50 "$PY" -m pytest -q -m "triton and gpu" $KERNEL_TESTS --junitxml="$OUT/kernels_gpu.xml"

# 3. The end-to-end ladder at N=200: the original-style row first, measured at N=8 and extrapolated to
#    N=200 (its LNAMD runs on the CPU: ~900 CPU-seconds at N=200; the row is labelled), then our rows.
step e2e-n200 140 "$PY" bench/bench_e2e.py "${LADDER[@]}" --original-n 8 \
    --rows original triton_bf16 triton_fp16 triton_fp32 torch_per_r

# 4. Single MSM passes at N=1000 (instead of an e2e run): fast modes first, the slow fp32 ones last.
step msm-n1000 100 $MSM --n 1000 --single --providers triton,torch,triton_fma --precision bf16,fp16,fp32

# 5. Every kernel test compiled on CUDA (the cases the CPU run checks under the interpreter, plus the
#    offline sm_90 build check against this machine's Triton).
step tests-compiled 120 "$PY" -m pytest -q $XDIST -m "triton and not gpu" $KERNEL_TESTS \
    --junitxml="$OUT/kernels_compiled.xml"

# ---------------------------------------------------------------------------------------------------
{
    echo "===== summary (failed steps: $FAILED; timeouts planned ${PLANNED}s of a ${BUDGET}s budget; ${SECONDS}s)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
if [ "$DRY" = 1 ] && [ "$PLANNED" -gt $((BUDGET - 15)) ]; then
    echo "dry run: the step timeouts (${PLANNED}s) do not fit the ${BUDGET}s budget" | tee -a "$LOG"
    FAILED=$((FAILED + 1))
fi
tar -czf "$OUT/logs.tar.gz" -C "$OUT" steps && rm -rf "$OUT/steps"
exit "$FAILED"
