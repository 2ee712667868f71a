#!/usr/bin/env bash
# The first GPU run's plan, in one call that ends within 480 s on an H100 or H200, the build included; what it
# measures goes beside the predictions of docs/gpu-performance.md. In order:
#   build (CUDA kernels for sm_90) → correctness: (16, {12, 48}, 32, 32) float32, one float64 case, C = 96 at 64×64
#   → inverse, adjoint and forward against cuDNN with TF32 off and on (B = 16, C ∈ {12, 48}, 32×32) → the same at
#   k = 1 → at C = 48: B ∈ {1, 16, 132, 264} × threads and blocks per image → one ncu pass over the wavefront kernel
#   (where performance counters are permitted) → the FInC-algorithm baseline at C = 12
# then, while the budget lasts: the CUDA tests, the Triton tests marked gpu_smoke and Triton's benchmark (autotuning
# off unless CINC_TRITON_AUTOTUNE=1), the remaining Triton tests.
# Needs nothing from a package registry: it builds in place with the torch that is installed.
#
#   bash tools/gpu_check.sh                                  # results in $OUT, else benchmarks/results/gpu/
#   CINC_SKIP_BUILD=1 OUT=/tmp/gc bash tools/gpu_check.sh    # reuse the in-place build; on a machine without a GPU
#                                                            # every GPU stage is skipped
#   CINC_GPU_CHECK_REHEARSAL=1 CINC_SKIP_BUILD=1 OUT=/tmp/gc bash tools/gpu_check.sh
#                                                            # no GPU: the benchmark stages on the CPU at tiny shapes
#   CINC_GPU_CHECK_BUDGET_S=300 bash tools/gpu_check.sh      # a shorter budget (default 470 s)
#
# What comes back: $OUT/gpu_check.tar.gz (every log, CSV and table, one folder per stage) and $OUT/summary.txt
# (each stage's outcome and the headline numbers). Both are rewritten after every stage, so a run stopped at any
# point — even by SIGKILL — leaves what the finished stages measured; a trap packs once more on any other exit.
# Each stage runs under its own time limit, never past the budget; a stage that fails does not stop the next. The
# stages of the plan have caps that add up to no more than the budget, so only the extras are ever cut by it.
set -u
cd "$(dirname "$0")/.."

DEST="${OUT:-$(pwd)/benchmarks/results/gpu}"
mkdir -p "$DEST"
WORK=$(mktemp -d)
PY="${PYTHON:-python3}"
BUDGET="${CINC_GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
STATUS="$WORK/stages.txt"
: > "$STATUS"

elapsed() { echo $(( $(date +%s) - START )); }

pack() {  # the archive and the summary, each replaced atomically
  {
    echo "gpu_check.sh: $(elapsed) s of a ${BUDGET} s budget, $(date -u '+%Y-%m-%d %H:%M UTC')"
    head -n 3 "$WORK/environment.txt" 2>/dev/null
    echo
    cat "$STATUS"
    for f in "$WORK"/*/result.txt; do
      if [ -f "$f" ]; then echo "$(basename "$(dirname "$f")"): $(cat "$f")"; fi
    done
    for f in "$WORK"/*/summary.txt; do
      if [ -f "$f" ]; then echo; echo "== $(basename "$(dirname "$f")")"; head -n 40 "$f"; fi
    done
  } > "$WORK/summary.txt" 2>&1
  cp "$WORK/summary.txt" "$DEST/summary.txt.tmp" && mv "$DEST/summary.txt.tmp" "$DEST/summary.txt"
  tar czf "$DEST/gpu_check.tar.gz.tmp" -C "$WORK" . && mv "$DEST/gpu_check.tar.gz.tmp" "$DEST/gpu_check.tar.gz"
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  echo "finished: exit $rc after $(elapsed) s" >> "$STATUS"
  pack
  rm -rf "$WORK"
  echo "results: $DEST/gpu_check.tar.gz and $DEST/summary.txt"
  exit "$rc"
}
trap finish EXIT
trap 'echo "stopped by a signal" >> "$STATUS"; exit 143' INT TERM

# stage NAME CAP_S COMMAND...: runs COMMAND (which writes its results into $WORK/NAME/) for at most CAP_S seconds and
# never past the budget; logs to $WORK/NAME/log.txt; records the outcome; packs.
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then
    echo "$name: skipped, ${left} s of the budget left" >> "$STATUS"
    return 0
  fi
  mkdir -p "$WORK/$name"
  echo "=== $name (limit ${limit} s)"
  local t0
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$WORK/$name/log.txt" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 15 "$WORK/$name/log.txt"
  case $rc in
    0) echo "$name: ok in ${took} s" >> "$STATUS" ;;
    124|137) echo "$name: TIMED OUT at ${limit} s" >> "$STATUS" ;;
    *) echo "$name: FAILED (exit $rc) in ${took} s" >> "$STATUS" ;;
  esac
  pack
  return $rc
}

# stage, then pytest's last line ("3 passed, 1 skipped in 2.1s") into the stage's result.txt, for the summary.
pytest_stage() {
  local name=$1
  stage "$@"
  local rc=$?
  if [ -f "$WORK/$name/log.txt" ]; then
    grep -E "passed|failed|error|no tests ran" "$WORK/$name/log.txt" | tail -n 1 > "$WORK/$name/result.txt"
    [ -s "$WORK/$name/result.txt" ] || echo "no pytest summary line (see $name/log.txt)" > "$WORK/$name/result.txt"
    pack
  fi
  return $rc
}

# bench NAME CAP_S PART ARGS...: one part of benchmarks/bench_gpu.py, its CSV, table and summary in $WORK/NAME/.
bench() {
  local name=$1 cap=$2
  shift 2
  stage "$name" "$cap" "$PY" benchmarks/bench_gpu.py "$@" --out "$WORK/$name" $DRY_RUN
}

{
  date -u
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "no nvidia-smi"
  fi
  "$PY" -c "import torch, platform as p; print('torch', torch.__version__, torch.version.cuda, p.python_version())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
  nvcc --version 2>&1 | tail -n 2
  command -v ncu > /dev/null && ncu --version 2>&1 | tail -n 1
} > "$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt"
pack

# Triton's forward autotunes per shape on a GPU unless told not to: minutes of compiling that the budget cannot pay.
export CINC_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export CINC_TRITON_AUTOTUNE="${CINC_TRITON_AUTOTUNE:-0}"
if [ "${CINC_SKIP_BUILD:-0}" = 1 ]; then
  echo "build: skipped (CINC_SKIP_BUILD=1)" >> "$STATUS"
elif ! stage build 180 "$PY" setup.py -q build_ext --inplace; then
  echo "the build failed: nothing else can run (see build/log.txt)"
  exit 1
fi
stage info 30 "$PY" -m cinc_kernels info

DRY_RUN=""
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ "${CINC_GPU_CHECK_REHEARSAL:-0}" != 1 ]; then
    echo "GPU stages: skipped, no CUDA GPU is visible" >> "$STATUS"
    exit 0
  fi
  echo "rehearsal: no CUDA GPU is visible; the benchmark stages run on the CPU at tiny shapes (--dry-run)" >> "$STATUS"
  DRY_RUN="--dry-run"
fi

# The plan.
bench correctness 45 correctness
bench ops 60 ops --batch 16 --channels 12 48 --sizes 32 --tf32 off on
bench ksize 30 ops --batch 16 --channels 12 48 --sizes 32 --kernel-sizes 1 --tf32 off
bench sweep 50 sweep --channels 48 --sizes 32 --batches 1 16 132 264 --threads 96 192 384 512 \
  --blocks-per-image 1 2 4 8
if [ -n "$DRY_RUN" ]; then
  echo "ncu: skipped, no GPU" >> "$STATUS"
elif ! command -v ncu > /dev/null; then
  echo "ncu: skipped, no ncu on this machine" >> "$STATUS"
else
  # The wavefront kernels (not the coefficient kernels before them) of one inverse and one adjoint at (16, 48, 32,
  # 32): bank conflicts, generic against shared loads, issue slots.
  stage ncu 40 ncu --target-processes all --kernel-name regex:^wavefront_kernel --launch-count 2 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
    --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis_Tables \
    --section SourceCounters --export "$WORK/ncu/wavefront" --force-overwrite \
    "$PY" benchmarks/bench_gpu.py profile --out "$WORK/ncu"
  if grep -q "ERR_NVGPUCTRPERM" "$WORK/ncu/log.txt" 2>/dev/null; then
    echo "ncu: performance counters are not permitted on this machine (ERR_NVGPUCTRPERM): nothing profiled" \
      > "$WORK/ncu/result.txt"
    pack
  fi
fi
bench finc 35 finc --batch 16 --channels 12 --sizes 32
if [ -n "$DRY_RUN" ]; then
  echo "tests: skipped, no GPU" >> "$STATUS"
  exit 0
fi

# While the budget lasts: the CUDA tests, then Triton compiled for the GPU (no interpreter): the tests its author
# marked worth a GPU's time, its benchmark, the remaining Triton tests.
pytest_stage test_cuda 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  tests/test_backend_contract.py -k cuda --junitxml="$WORK/test_cuda/junit.xml"
if [ -d tests/triton ]; then
  pytest_stage test_triton_smoke 60 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu_smoke \
    tests/triton --junitxml="$WORK/test_triton_smoke/junit.xml"
fi
if [ -f benchmarks/bench_triton.py ]; then
  stage bench_triton 45 "$PY" benchmarks/bench_triton.py --out "$WORK/bench_triton" --batch 16 --channels 12 48 \
    --sizes 32
fi
if [ -d tests/triton ]; then
  pytest_stage test_triton_rest 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider \
    -m "not gpu_smoke" tests/triton tests/test_backend_contract.py -k triton --junitxml="$WORK/test_triton_rest/junit.xml"
fi
exit 0
