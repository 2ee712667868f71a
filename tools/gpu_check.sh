#!/usr/bin/env bash
# Everything worth a GPU's scarce minutes, in one call that ends within 480 s on an H200, the build included:
#   build (CUDA kernels for sm_90) → CUDA tests → the CUDA kernels against cuDNN and the FInC-style inverse
#   → a bounded Triton subset (tests marked gpu_smoke, a time-boxed bench_triton.py) → the rest (a wider benchmark
#   sweep, the Triton suite) while time is left.
# Needs nothing from a package registry: it builds in place with the torch that is installed.
#
#   bash benchmarks/gpu_check.sh                                   # results in $OUT, else benchmarks/results/gpu/
#   CINC_SKIP_BUILD=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh     # dry run: reuse the in-place build; on a machine
#                                                                  # without a GPU every GPU stage is skipped
#   CINC_GPU_CHECK_BUDGET_S=300 bash benchmarks/gpu_check.sh       # a shorter budget (default 470 s)
#
# What comes back: $OUT/gpu_check.tar.gz (every log, CSV and table, one folder per stage) and $OUT/summary.txt
# (each stage's outcome and the headline numbers). Both are rewritten after every stage, so a run stopped at any
# point — even by SIGKILL — leaves what the finished stages measured; a trap packs once more on any other exit.
# Each stage runs under its own time limit, never past the budget; a stage that fails does not stop the next.
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
    for f in "$WORK"/test_cuda/result.txt "$WORK"/test_triton_smoke/result.txt "$WORK"/test_triton_rest/result.txt; do
      if [ -f "$f" ]; then echo "$(basename "$(dirname "$f")"): $(cat "$f")"; fi
    done
    for f in "$WORK"/bench_gpu/summary.txt "$WORK"/bench_gpu_wide/summary.txt; do
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

# stage NAME CAP_S COMMAND...: runs COMMAND (which may write into $WORK/NAME/) for at most CAP_S seconds and never
# past the budget; logs to $WORK/NAME/log.txt; records the outcome; packs.
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
} > "$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt"
pack

export CINC_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
if [ "${CINC_SKIP_BUILD:-0}" = 1 ]; then
  echo "build: skipped (CINC_SKIP_BUILD=1)" >> "$STATUS"
elif ! stage build 240 "$PY" setup.py -q build_ext --inplace; then
  echo "the build failed: nothing else can run (see build/log.txt)"
  exit 1
fi
stage info 30 "$PY" -m cinc_kernels info

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "GPU stages: skipped, no CUDA GPU is visible" >> "$STATUS"
  exit 0
fi

# The CUDA backend, tested for real; then its benchmark at the shapes of the targets (B = 16, C = 48, 32×32 and 64×64).
pytest_stage test_cuda 130 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  tests/test_backend_contract.py -k cuda --junitxml="$WORK/test_cuda/junit.xml"
stage bench_gpu 110 "$PY" benchmarks/bench_gpu.py --out "$WORK/bench_gpu" --batch 16 --channels 48 --sizes 32 64

# Triton compiled for the GPU (no interpreter): the tests its author marked worth a GPU's time, then its benchmark.
if [ -d tests/triton ]; then
  pytest_stage test_triton_smoke 80 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu_smoke \
    tests/triton --junitxml="$WORK/test_triton_smoke/junit.xml"
fi
if [ -f benchmarks/bench_triton.py ]; then
  stage bench_triton 45 "$PY" benchmarks/bench_triton.py --out "$WORK/bench_triton" --batch 16 --channels 48 \
    --sizes 32 64
fi

# The rest, while the budget lasts: the wider sweep, then the remaining Triton tests.
stage bench_gpu_wide 120 "$PY" benchmarks/bench_gpu.py --out "$WORK/bench_gpu_wide" --skip finc
if [ -d tests/triton ]; then
  pytest_stage test_triton_rest 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider \
    -m "not gpu_smoke" tests/triton tests/test_backend_contract.py -k triton --junitxml="$WORK/test_triton_rest/junit.xml"
fi
exit 0
