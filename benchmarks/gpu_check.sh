#!/usr/bin/env bash
# Everything a GPU session needs in one call (< 8 minutes on the H200): build the CUDA kernels for Hopper, run the
# CUDA tests (and the Triton tests compiled for real, not interpreted), run benchmarks/bench_gpu.py, and print a
# short summary last. Results go to $OUT (the device tool's folder) or benchmarks/results/gpu/ by default.
#
#   bash benchmarks/gpu_check.sh            # on the device machine: run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#   BENCH_ARGS="--channels 48 --sizes 64" bash benchmarks/gpu_check.sh     # a narrower benchmark
#   CINC_SKIP_BUILD=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh             # check the script itself, no GPU needed
#
# Each stage has its own timeout so one hang cannot eat the whole budget; a failed stage is reported and the next
# one still runs (the benchmark is still worth having when a test fails).
set -u
cd "$(dirname "$0")/.."
# Everything is written to a scratch folder and packed at the end: the device tool returns at most 8 files from $OUT,
# so $OUT receives gpu_check.tar.gz (all logs, CSVs, tables) plus the few small files worth reading at once.
DEST="${OUT:-$(pwd)/benchmarks/results/gpu}"
mkdir -p "$DEST"
OUT=$(mktemp -d)
pack() {  # everything under the scratch folder, as one archive, plus the small files to read at once
  tar czf "$DEST/gpu_check.tar.gz" -C "$OUT" .
  for f in stages.txt environment.txt summary.txt; do
    if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$DEST/"; fi
  done
  echo "results: $DEST/gpu_check.tar.gz (unpack into benchmarks/results/gpu/ and commit)"
}
PY="${PYTHON:-python3}"
START=$(date +%s)
declare -a STATUS=()
stage() {  # stage NAME TIMEOUT_S COMMAND...: runs with a timeout, logs to $OUT/NAME.log, records the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  STATUS+=("$name: rc=$rc in $(( $(date +%s) - t0 ))s")
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -n 2
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

export CINC_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
# CINC_SKIP_BUILD=1 reuses the extension already built in place (to check this script on a machine without a GPU).
if [ "${CINC_SKIP_BUILD:-0}" = 1 ]; then
  STATUS+=("build: skipped (CINC_SKIP_BUILD=1)")
elif ! stage build 300 "$PY" setup.py -q build_ext --inplace; then
  echo "BUILD FAILED: see $OUT/build.log"
  printf '%s\n' "${STATUS[@]}" > "$OUT/stages.txt"
  pack
  exit 1
fi
"$PY" -m cinc_kernels info | tee "$OUT/info.txt"

stage test_cuda 150 "$PY" -m pytest -q -rs tests/test_cuda.py tests/test_backend_contract.py -k cuda --junitxml="$OUT/test_cuda.xml"
if [ -d tests/triton ]; then
  stage test_triton 90 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs tests/triton tests/test_backend_contract.py -k triton --junitxml="$OUT/test_triton.xml"
fi
stage selfcheck 60 "$PY" -m cinc_kernels check

# What is left of 8 minutes, minus a margin, goes to the benchmarks: ours first (up to 240 s), then the Triton
# backend's own benchmark when it is there.
LEFT=$(( 470 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 60 ]; then
  LIMIT=$(( LEFT < 240 ? LEFT : 240 ))
  # shellcheck disable=SC2086
  stage bench_gpu "$LIMIT" "$PY" benchmarks/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-}
else
  STATUS+=("bench_gpu: skipped, only ${LEFT}s left")
fi
LEFT=$(( 470 - ($(date +%s) - START) ))
if [ -f benchmarks/bench_triton.py ]; then
  if [ "$LEFT" -gt 45 ]; then
    stage bench_triton "$LEFT" "$PY" benchmarks/bench_triton.py --out "$OUT/triton"
  else
    STATUS+=("bench_triton: skipped, only ${LEFT}s left")
  fi
fi

printf '%s\n' "${STATUS[@]}" > "$OUT/stages.txt"
echo
echo "=== summary ($(( $(date +%s) - START ))s)"
cat "$OUT/stages.txt"
grep -E "passed|failed|error" "$OUT/test_cuda.log" | tail -n 1
[ -f "$OUT/test_triton.log" ] && grep -E "passed|failed|error" "$OUT/test_triton.log" | tail -n 1
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
[ -f "$OUT/bench_triton.log" ] && tail -n 5 "$OUT/bench_triton.log"
pack
exit 0
