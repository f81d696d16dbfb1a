#!/bin/bash
# Every GPU check of the CUDA backend in one run, within a time budget: the GPU tests, the
# kernel benches, and end-to-end decode on random-weight models of the shapes in BENCHMARKS.md.
# Run from the project root on the GPU machine, with the bundle (README "On a GPU") in
# target/gpu-bundle and stories260K plus SmolLM2's config/tokenizer files staged:
#   STORIES=<dir> SMOL_CFG=<dir> LOG=<dir> BUDGET=<seconds> bash benches/gpu_checks.sh [steps]
# `steps` (default: all) is a comma-separated subset of the step names below. What never ran on
# hardware comes first; a step that would start with under 15 s of BUDGET left is skipped and
# listed in summary.txt, so a second call naming the skipped steps (with `models` if the machine
# is fresh: the random-weight models live in $MODELS) finishes the set.
set -u
LOG=${LOG:-gpu-logs}; mkdir -p "$LOG"
T0=$(date +%s); BUDGET=${BUDGET:-540}; ONLY=${1:-all}
B=${BUNDLE:-target/gpu-bundle}; M=${MODELS:-/tmp/models}
# The bundle travels compressed (the device tool carries 64 MiB): unpack it once.
if [ ! -x "$B/gpu" ] && [ -f .gpu/bundle.tar.xz ]; then
  python3 -c "import tarfile; tarfile.open('.gpu/bundle.tar.xz').extractall('target')" && B=target/gpu-bundle
fi
export PYTHONUNBUFFERED=1 LLMD_KERNEL_CACHE=${LLMD_KERNEL_CACHE:-/tmp/kcache} RUST_BACKTRACE=1
SP=$(python3 -c "import site;print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
want() { [ "$ONLY" = all ] || [[ ",$ONLY," == *",$1,"* ]]; }
step() { # name timeout cmd...
  local n=$1 to=$2; shift 2
  want "$n" || return 0
  local l; l=$(left); [ "$l" -lt 15 ] && { echo "SKIP $n (no time)" | tee -a "$LOG/summary.txt"; return; }
  [ "$to" -gt "$l" ] && to=$l
  local s; s=$(date +%s)
  timeout -k 5 "$to" "$@" > "$LOG/$n.log" 2>&1; local rc=$?
  echo "$n rc=$rc limit=${to}s took=$(( $(date +%s) - s ))s" | tee -a "$LOG/summary.txt"
  tail -"${TAIL:-20}" "$LOG/$n.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOG/env.txt" 2>&1; cat "$LOG/env.txt"
mkdir -p "$M" && cp -r "${STORIES:-../shared/models/stories260K}" "$M/"
step models 120 python3 benches/mk_models.py "$M" "${SHAPES:-smollm2-135m-shape,smol-1.7b-shape,llama3-8b-shape}" "${SMOL_CFG:-../shared/models/smollm2-135m-instruct}"
export LLMD_SHARED_MODELS=$M LLMD_GPU_MODELS=stories260K
# First what has never run on hardware (issue 25, "Run first"), then the figures.
step gpu_tests 280 "$B/gpu" --ignored --test-threads=1
# KV tier offload: the tiers' path (GPU -> host) vs one pinned cudaMemcpy of the same bytes.
step kv_offload 60 "$B/kv_offload_gpu"
# P/D between `llmd serve --device cuda` processes on this one GPU (prefiller, decoder and a
# sidecar) against a single worker, greedy, with the official openai client
# (tests/disagg_openai.py); its wheels travel in $WHEELS when this machine lacks them.
python3 -c "import openai, pytest" 2>/dev/null ||
  python3 -m pip install -q --no-index --find-links "${WHEELS:-.gpu/wheels}" openai pytest > "$LOG/wheels.log" 2>&1
for m in stories260K smollm2-135m-shape; do
  step "pd_cuda_$m" 90 env LLMD_BIN="$B/llmd" LLMD_MODEL="$M/$m" \
    LLMD_SERVE_ARGS="--device cuda --max-model-len 512 --kv-cache-memory-gb 0.05" python3 -m pytest -q tests/disagg_openai.py
done
# Both prefill kernels (tiled, pipelined) against torch's flash SDPA.
step cuda_prefill 90 python3 benches/prefill_vs_sdpa.py "$B/cuda_prefill"
# The skinny decode GEMM (opt-in until measured): its matmuls vs cuBLAS, then end to end.
step cuda_gemm 90 "$B/cuda_gemm"
step decode_8b_skinny 60 env LLMD_DECODE_GEMM=skinny LLMD_BENCH_MODEL="$M/llama3-8b-shape" "$B/gpu_decode"
step cuda_attention 60 "$B/cuda_attention"
step decode_135m 90 python3 benches/decode_vs_transformers.py "$B/gpu_decode" "$M/smollm2-135m-shape"
step decode_8b 150 python3 benches/decode_vs_transformers.py "$B/gpu_decode" "$M/llama3-8b-shape"
step decode_1p7b 60 env LLMD_BENCH_MODEL="$M/smol-1.7b-shape" "$B/gpu_decode"
# The same without the transformers side (llmd's figures only, a third of the time), then with
# a host KV tier taking every committed block after its step (target: steps ≤ 3 % slower).
step decode_8b_llmd 60 env LLMD_BENCH_MODEL="$M/llama3-8b-shape" "$B/gpu_decode"
step decode_8b_offload 60 env LLMD_BENCH_KV_OFFLOAD_GB=16 LLMD_BENCH_MODEL="$M/llama3-8b-shape" "$B/gpu_decode"
step cuda_sampling 45 "$B/cuda_sampling"
# Where a decode step's device time goes, kernel by kernel (Nsight Systems, when installed).
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
  for m in smollm2-135m-shape llama3-8b-shape; do
    step "nsys_$m" 120 env LLMD_BENCH_MODEL="$M/$m" LLMD_BENCH_GEN=64 "$NSYS" profile -o "/tmp/nsys_$m" --force-overwrite true --stats=true "$B/gpu_decode"
  done
else
  echo "nsys: not installed" | tee -a "$LOG/summary.txt"
fi
# Where batch-1 decode of the 8B shape loses to the roofline, kernel by kernel (Nsight Compute,
# eager so every kernel is its own launch; ~2 decode steps after the prompt's prefill).
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  step ncu_8b 150 env LLMD_BENCH_MODEL="$M/llama3-8b-shape" LLMD_BENCH_EAGER=1 LLMD_BENCH_BATCH=1 LLMD_BENCH_GEN=4 "$NCU" --metrics gpu__time_duration.sum --csv --log-file "$LOG/ncu_8b.csv" -c 1000 "$B/gpu_decode"
  want ncu_8b && python3 benches/ncu_summary.py "$LOG/ncu_8b.csv" 2>&1 | tee "$LOG/ncu_8b_summary.txt"
else
  echo "ncu: not installed" | tee -a "$LOG/summary.txt"
fi
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$LOG/summary.txt"
