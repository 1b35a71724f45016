#!/usr/bin/env bash
# The project's one command for a GPU machine (shared/GPU.md): build the CUDA kernels, verify
# them against the reference, run the CUDA tests, compute-sanitizer on a small case, and the
# benchmark. Logs and a summary table go to $OUT (default build/gpu_check); the table is
# printed last. Without a GPU it says so and exits 0.
#
#   OUT=dir benchmarks/gpu_check.sh
#
# Knobs: PYTHON (python3), CUDA_HOME (/usr/local/cuda), TORCH_CUDA_ARCH_LIST ("9.0;9.0a"),
# MAX_JOBS (16), GPU_CHECK_BUDGET_S (480: the whole run; each step also has its own limit, and
# steps that no longer fit are skipped, most important first).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
PYTHON=${PYTHON:-python3}

if [[ "${CUDA_VISIBLE_DEVICES-unset}" == "" || "${CUDA_VISIBLE_DEVICES-unset}" == "-1" ]]; then
  echo "gpu_check: no GPU: CUDA_VISIBLE_DEVICES hides every device; nothing to check"
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  echo "gpu_check: no GPU found (nvidia-smi is missing or lists no device); nothing to check"
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
ROWS=()
FAILED=0
BUDGET=${GPU_CHECK_BUDGET_S:-480}

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND with its output in $OUT/LOG, adds a table row.
# The limit shrinks to what is left of the budget; under 30 s left, the step is skipped.
step() {
  local name=$1 limit=$2 log=$3 start=$SECONDS rc status left=$((BUDGET - SECONDS))
  shift 3
  if ((left < 30)); then
    skip "$name" "out of time (GPU_CHECK_BUDGET_S=$BUDGET)"
    FAILED=1
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "gpu_check: $name (limit ${limit}s) ..."
  timeout "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [[ $rc -eq 0 ]] || FAILED=1
  ROWS+=("| $name | $status | $((SECONDS - start)) | $log |")
  return $rc
}

skip() {  # skip NAME REASON
  ROWS+=("| $1 | skipped: $2 | 0 | |")
}

finish() {
  {
    echo
    echo "## gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
    echo
    echo "| step | result | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
  } >"$OUT/summary.md"
  for f in verify.md bench/fuse_kv_cuda.md; do
    [[ -f "$OUT/$f" ]] && { echo; echo "### $f"; tail -n 40 "$OUT/$f"; }
  done
  cat "$OUT/summary.md"
  exit $FAILED
}

{
  nvidia-smi
  command -v nvcc && nvcc --version
  "$PYTHON" -c "import sys, torch; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/environment.txt" 2>&1

# Build the extension in place (the .so lands in python/lococo).
if ! step "build" 360 build.log env CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" LOCOCO_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0;9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:---threads 0}" "$PYTHON" setup.py build_ext --inplace; then
  finish
fi
step "import" 60 import.log "$PYTHON" -c "
import lococo, lococo._C as c
print(lococo.__version__, 'kernels on', lococo.kernel_devices(), 'archs', c.cuda_archs())
assert lococo.has_kernel('cuda'), 'no CUDA kernel registered'" || finish

step "verify: kernel paths vs reference" 150 verify.log \
  "$PYTHON" benchmarks/sanitize_case.py --verify --out "$OUT/verify.md"

# The CUDA tests. Test files that need hypothesis are left out when it is not installed.
PYTEST_ARGS=(tests -k cuda -q -p no:cacheprovider)
if ! "$PYTHON" -c "import hypothesis" >/dev/null 2>&1; then
  for f in $(grep -l -E "^(import|from) hypothesis" tests/*.py 2>/dev/null); do
    PYTEST_ARGS+=(--ignore "$f")
    echo "hypothesis is not installed: left out $f" >>"$OUT/environment.txt"
  done
fi
step "pytest -k cuda" 240 pytest_cuda.log "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"

# compute-sanitizer on a small case; only lococo's kernels are instrumented when the tool
# can filter, and the caching allocator is off so that out-of-bounds accesses are not hidden.
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
sanitize() {  # sanitize TOOL
  if [[ ! -x "$SANITIZER" ]]; then
    skip "compute-sanitizer $1" "compute-sanitizer not found"
    return
  fi
  local filter=()
  "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name" && filter=(--kernel-name kns=lococo)
  step "compute-sanitizer $1" 150 "sanitizer_$1.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$1" --error-exitcode 1 "${filter[@]}" "$PYTHON" benchmarks/sanitize_case.py
}
sanitize memcheck
sanitize racecheck

if [[ -f benchmarks/bench_fuse_kv.py ]]; then
  step "benchmark (bf16)" 200 bench.log "$PYTHON" benchmarks/bench_fuse_kv.py --device cuda --dtype bfloat16 \
    --budget 1 --out "$OUT/bench"
else
  skip "benchmark" "benchmarks/bench_fuse_kv.py not found"
fi

SIMT_ARGS=("${PYTEST_ARGS[@]}")
SIMT_ARGS[2]="cuda and forward"
step "pytest -k 'cuda and forward', LOCOCO_CUDA_PATH=simt" 120 pytest_cuda_simt.log \
  env LOCOCO_CUDA_PATH=simt "$PYTHON" -m pytest "${SIMT_ARGS[@]}"
sanitize synccheck
finish
