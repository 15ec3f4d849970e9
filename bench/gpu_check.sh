#!/usr/bin/env bash
# One prepared GPU check for an H200 session (15 minutes of device time in all; this script is sized
# for about 7 minutes and at most 10 (600 s of timeouts) if every step hits its timeout). Run from the
# repository root:
#
#     bash bench/gpu_check.sh
#
# Writes everything under $OUT (the device tool's output folder), or bench/results/ when $OUT is unset:
#   gpu_check.log            all output, step by step, with a summary table at the end
#   env.txt                  nvidia-smi, python/torch/triton versions
#   kernels_gpu.xml, kernels_compiled.xml   pytest junit reports
#   bench_msm_cuda.csv, bench_lnamd_cuda.csv, bench_e2e_cuda.csv, bench_boxgram_cuda.csv  benchmark rows
# Needs torch + triton + pytest there (no faiss, no open_clip: those tests/providers skip themselves),
# and bench/harness.py (from main). Steps run in priority order and the script goes on after a failure;
# the exit status is the number of failed steps.
set -uo pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET            # compiled kernels, CUDA tensors
export MUSC_FAST_AUTOTUNE=0       # fixed default configs (MUSC_FAST_AUTOTUNE=1 bench/bench_msm.py tunes)
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
SUMMARY=()
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, tee into the log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    echo "===== [$name] timeout ${limit}s: $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local dt=$((SECONDS - t0))
    [ "$rc" -eq 124 ] && echo "===== [$name] TIMED OUT after ${limit}s" | tee -a "$LOG"
    echo "===== [$name] rc=$rc ${dt}s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-22s rc=%-4s %4ss' "$name" "$rc" "$dt")")
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    return 0
}

# 1. What machine is this (also proves CUDA + triton import).
step env 30 bash -c 'nvidia-smi; python3 -c "import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")"'
cp "$LOG" "$OUT/env.txt"

# 2. Correctness on the GPU at larger shapes (pytest -m gpu: paper grid L=1369, C=1024, N=200 interval).
step tests-gpu 60 python3 -m pytest -q -m gpu tests/test_kernels.py --junitxml="$OUT/kernels_gpu.xml"

# 3. The headline: one MSM pass at the paper shape (N=200, L=1369, C=1024): original loop, torch path,
#    Triton kernels in fp32 (TF32 off), bf16 and tf32, plus the torch.mm roofline measured in the same run.
step bench-msm-paper 120 python3 bench/bench_msm.py --paper --providers original,torch,triton \
    --precision fp32,bf16,tf32 --reps 3 --original-reps 2 --out "$OUT/bench_msm_cuda.csv"

# 3b. The end-to-end ladder at the paper's cost (ViT-L/14 through timm, random weights, 518 px: L=1369,
#     C=1024, layers 5 11 17 23, r 1 3 5; random images), N=200: the original-style pipeline, the torch
#     per-(layer, r) path, Triton fp32 and bf16 (the one-Gram paths: the next step).
step bench-e2e-n200 160 python3 bench/bench_e2e.py --backbone dinov2_vitl14 --image-size 518 \
    --layers 5 11 17 23 --n 200 --batch-size 32 --images "" --device cuda \
    --rows original torch_per_r triton_fp32 triton_bf16 --out "$OUT/bench_e2e_cuda.csv"

# 3c. The one-Gram Triton kernels (kernels/boxgram.py) against per-r Triton passes, one layer at the paper
#     shape (synthetic tokens, N=200, G=37, C=1024, r 1 3 5), bf16 then fp32; rows are written as they
#     finish. Decides whether MUSC_FAST_BOXGRAM's auto should take the one-Gram path on CUDA.
step bench-boxgram-paper 60 python3 bench/bench_boxgram.py --paper --providers triton --precision bf16,fp32 \
    --reps 1 --out "$OUT/bench_boxgram_cuda.csv"

# 4. Every kernel test compiled on CUDA (the same cases the CPU run checks under the interpreter,
#    plus the offline sm_90 build check against this machine's Triton).
step tests-compiled 60 python3 -m pytest -q -m "not gpu" tests/test_kernels.py \
    --junitxml="$OUT/kernels_compiled.xml"

# 5. LNAMD at the paper shape for one layer (N=200, G=37, C=1024, fp16 tokens, r = 1, 3, 5).
step bench-lnamd-paper 30 python3 bench/bench_lnamd.py --paper --out "$OUT/bench_lnamd_cuda.csv"

# 6. The ladder at N=1000 in one process group (no divide_num), Triton bf16 (fp32 would take minutes).
step bench-e2e-n1000 75 python3 bench/bench_e2e.py --backbone dinov2_vitl14 --image-size 518 \
    --layers 5 11 17 23 --n 1000 --batch-size 32 --images "" --device cuda \
    --rows triton_bf16 --out "$OUT/bench_e2e_cuda.csv"

# ---------------------------------------------------------------------------------------------------

{
    echo "===== summary (failed steps: $FAILED)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
exit "$FAILED"
