#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU: build the CUDA kernels for sm_90, verify them
# against the float64 reference, benchmark them, run generate() on CUDA against the same run on
# the CPU, run the CUDA tests, then compute-sanitizer. Made for a device window of about 8
# minutes that returns at most 8 files from $OUT, so:
#   * every step has its own time limit and the whole run has GPU_CHECK_BUDGET_S (480 s); a step
#     also gets what earlier steps left unused, never runs past what is left, and a failing step
#     never stops the later ones (only a failed build or import does: nothing can run after them);
#   * $OUT receives exactly the files listed in the plan, rewritten after every step, so a run
#     killed from outside still returns everything up to its last finished step.
# Without a GPU (or with GPU_CHECK_PLAN_ONLY=1) it prints the plan and exits 0.
#
#   OUT=dir tools/gpu_check.sh
#
# Knobs: PYTHON (python3), GPU_CHECK_BUDGET_S (480), MAX_JOBS (16), CUDA_HOME (default: the
# toolkit of the nvcc on PATH, else /usr/local/cuda).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}

# name | limit in seconds | what it runs. In this order: what later steps need first, then
# correctness, speed, the tests, and the slow sanitizer tools last.
PLAN=(
  "build|170|setup.py build_ext --inplace, sm_90 only, -Xptxas -v for registers and spills (330 s without ninja)"
  "import|15|import lococo; python -m lococo.info; the CUDA kernel is registered"
  "verify|40|tools/sanitize_case.py --verify: every kernel path and dtype against the float64 reference, backward, determinism"
  "benchmark|75|benchmarks/bench_fuse_kv.py: forward, eager and compiled reference vs the op, with valid_len, CUDA graph replay, per-kernel times"
  "generate|25|tools/generate_cuda_check.py: generate() through lococo_sdpa and LoCoCoCache on CUDA against the same run on the CPU"
  "bench_generate|50|benchmarks/bench_generate.py --device cuda --dtype bfloat16: decode tokens/s and peak memory, 1K-32K"
  "pytest|45|pytest tests -k cuda (TF32 off, float64 oracles)"
  "memcheck|30|compute-sanitizer --tool memcheck on tools/sanitize_case.py"
  "racecheck|20|compute-sanitizer --tool racecheck on tools/sanitize_case.py"
  "synccheck|10|compute-sanitizer --tool synccheck on tools/sanitize_case.py"
)
FILES=(
  "summary.md|versions, GPU, one row per step, ptxas registers and spills, the benchmark tables"
  "verify.md|the verification table of every kernel path"
  "fuse_kv_cuda.csv|benchmark rows, written as each finishes"
  "fuse_kv_cuda.md|the same as a table, with the per-kernel time attribution"
  "logs.tgz|every step's full log, the environment, bench_generate's csv and md"
)

print_plan() {
  local entry name limit what total=0
  echo "gpu_check plan (budget ${BUDGET}s for the whole run, build included):"
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r name limit what <<<"$entry"
    total=$((total + limit))
    printf '  %-15s %4ss  %s\n' "$name" "$limit" "$what"
  done
  echo "  sum of the step limits: ${total}s"
  echo "files written to \$OUT (${#FILES[@]}):"
  for entry in "${FILES[@]}"; do
    IFS='|' read -r name what <<<"$entry"
    printf '  %-17s %s\n' "$name" "$what"
  done
}

limit_of() {  # limit_of STEP: the planned limit of a step
  local entry name limit what
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r name limit what <<<"$entry"
    [[ $name == "$1" ]] && { echo "$limit"; return; }
  done
  echo "gpu_check: no step named $1 in the plan" >&2
  exit 2
}

reserved_after() {  # reserved_after STEP: the planned limits of the steps after it, summed
  local entry name limit what after=0 total=0
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r name limit what <<<"$entry"
    ((after)) && total=$((total + limit))
    [[ $name == "$1" ]] && after=1
  done
  echo "$total"
}

print_plan
if [[ "${GPU_CHECK_PLAN_ONLY:-0}" == 1 ]]; then
  echo "gpu_check: GPU_CHECK_PLAN_ONLY=1; nothing run"
  exit 0
fi
if [[ "${CUDA_VISIBLE_DEVICES-unset}" == "" || "${CUDA_VISIBLE_DEVICES-unset}" == "-1" ]]; then
  echo "gpu_check: no GPU: CUDA_VISIBLE_DEVICES hides every device; nothing run"
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  echo "gpu_check: no GPU found (nvidia-smi is missing or lists no device); nothing run"
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ -z "${CUDA_HOME:-}" ]]; then
  if NVCC=$(command -v nvcc); then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
ROWS=()
FAILED=0
START=$SECONDS

# The versions first: they go at the top of summary.md.
"$PYTHON" - >"$LOGS/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform, subprocess, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip().splitlines()
print(f"- GPU: {smi[0] if smi else 'unknown'}")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
print(f"- python {platform.python_version()}, setuptools {version('setuptools')}, "
      f"transformers {version('transformers')}, pytest {version('pytest')}")
EOF
# Without ninja, torch builds the sources one after another: the build gets more time, taken
# from the last steps (the sanitizer tools), which are cut or skipped as the budget runs out.
BUILD_LIMIT=$(limit_of build)
if "$PYTHON" -c "import sys, torch.utils.cpp_extension as c; sys.exit(not c.is_ninja_available())" >/dev/null 2>&1; then
  NINJA=yes
else
  NINJA="no: sources compile one after another, the build may use up to 330 s"
  BUILD_LIMIT=330
fi
{
  echo "- ninja: $NINJA"
  echo "- nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -n 1) (CUDA_HOME=$CUDA_HOME)"
  echo "- commit: $(git log -1 --format='%h %s' 2>/dev/null || echo unknown)"
} >>"$LOGS/versions.txt"
{ nvidia-smi; env | grep -E '^(CUDA|TORCH|NVIDIA|LOCOCO|PYTORCH)' | sort; } >"$LOGS/environment.txt" 2>&1

# Registers and spills of every kernel, from ptxas -v in the build log (one line per kernel).
ptxas_table() {
  "$PYTHON" - "$LOGS/build.log" <<'EOF'
import re, subprocess, sys
text = open(sys.argv[1], errors="replace").read()
rows, name, spills = [], None, "?"
for line in text.splitlines():
    if m := re.search(r"Compiling entry function '(\w+)'", line):
        name, spills = m.group(1), "?"
    elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        spills = f"{m.group(1)} / {m.group(2)}"
    elif name and (m := re.search(r"Used (\d+) registers", line)):
        rows.append((name, m.group(1), spills))
        name = None
if not rows:
    print("(no ptxas -v output in the build log)")
    sys.exit()
try:
    names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.splitlines()
except OSError:
    names = []
if len(names) != len(rows):
    names = [r[0] for r in rows]
print("| kernel | registers | spill stores / loads (bytes) |\n|---|---|---|")
for (_, regs, spills), pretty in zip(rows, names):
    short = re.sub(r"^void |\(.*$", "", pretty)[:110]
    print(f"| `{short}` | {regs} | {spills} |")
EOF
}

write_outputs() {  # summary.md and logs.tgz as they stand now
  {
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    cat "$LOGS/versions.txt"
    echo "- budget ${BUDGET}s, used $((SECONDS - START))s"
    echo
    echo "| step | result | seconds | limit | log in logs.tgz |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    if [[ -f "$LOGS/build.log" ]]; then
      echo
      echo "## ptxas: registers and spills (sm_90)"
      echo
      ptxas_table 2>&1
    fi
    for section in "benchmark|$OUT/fuse_kv_cuda.md" "generate() CPU vs CUDA|$LOGS/generate.log" \
                   "bench_generate|$LOGS/generate/generate.md" \
                   "bench_generate, Llama-2-7B shapes|$LOGS/generate/generate-llama-2-7b-2layers.md"; do
      IFS='|' read -r title file <<<"$section"
      [[ -f "$file" ]] || continue
      echo
      echo "## $title"
      echo
      tail -n 60 "$file"
    done
  } >"$OUT/summary.md"
  tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
}

# step NAME LOG COMMAND...: runs COMMAND with its output in LOG; records a row and rewrites the
# outputs. Its limit is its planned one plus what earlier steps left unused (what is left of
# the budget less the planned limits of the later steps), and never more than is left.
step() {
  local name=$1 log=$2 limit start=$SECONDS rc status left
  shift 2
  limit=$(limit_of "$name")
  [[ $name == build ]] && limit=$BUILD_LIMIT
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 5)); then
    ROWS+=("| $name | skipped: out of time | 0 | $limit | |")
    FAILED=1
    write_outputs
    return 1
  fi
  ((left - $(reserved_after "$name") > limit)) && limit=$((left - $(reserved_after "$name")))
  ((limit > left)) && limit=$left
  echo "gpu_check: $name (limit ${limit}s) ..."
  timeout --kill-after=5 "$limit" "$@" >"$LOGS/$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="**TIMEOUT** after ${limit}s" ;;
    *) status="**FAILED** (exit $rc)" ;;
  esac
  ((rc == 0)) || FAILED=1
  ROWS+=("| $name | $status | $((SECONDS - start)) | $limit | $log |")
  echo "gpu_check: $name: $status"
  write_outputs
  return $rc
}

skip() {  # skip NAME REASON
  ROWS+=("| $1 | skipped: $2 | 0 | $(limit_of "$1") | |")
  write_outputs
}

finish() {
  write_outputs
  rm -rf "$LOGS"
  echo
  cat "$OUT/summary.md"
  exit $FAILED
}

if ! step build build.log env LOCOCO_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" \
    NVCC_APPEND_FLAGS="-Xptxas -v" "$PYTHON" setup.py build_ext --inplace; then
  finish
fi
step import import.log "$PYTHON" -c "
import runpy, sys, lococo
sys.argv = ['lococo.info']
runpy.run_module('lococo.info', run_name='__main__')
assert lococo.has_kernel('cuda'), 'no CUDA kernel registered'" || finish

step verify verify.log "$PYTHON" tools/sanitize_case.py --verify --out "$OUT/verify.md"

step benchmark benchmark.log "$PYTHON" benchmarks/bench_fuse_kv.py --device cuda --dtype bfloat16 \
  --direction forward --budget 0.5 --compile-shapes "smollm2-135m decode" "llama-2-7b prefill" \
  --valid-len --cuda-graph --attribution "llama-2-7b decode" --out "$OUT"

step generate generate.log "$PYTHON" tools/generate_cuda_check.py

step bench_generate bench_generate.log bash -c "'$PYTHON' benchmarks/bench_generate.py --device cuda \
  --dtype bfloat16 --contexts 1024 8192 32768 --decode-tokens 32 --caches full lococo h2o --kv-bits 16 8 4 \
  --out '$LOGS/generate' \
  && '$PYTHON' benchmarks/bench_generate.py --model llama-2-7b-2layers --device cuda --dtype bfloat16 \
  --contexts 1024 8192 32768 --decode-tokens 32 --caches full lococo h2o --out '$LOGS/generate'"

if "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
  PYTEST_ARGS=(tests -k cuda -q -p no:cacheprovider)
  if ! "$PYTHON" -c "import hypothesis" >/dev/null 2>&1; then
    for f in $(grep -l -E "^(import|from) hypothesis" tests/*.py 2>/dev/null); do
      PYTEST_ARGS+=(--ignore "$f")
    done
  fi
  step pytest pytest.log "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"
else
  skip pytest "pytest is not installed"
fi

# Only lococo's kernels are instrumented when the tool can filter, and the caching allocator is
# off so that out-of-bounds accesses inside a cached block are not hidden.
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
for tool in memcheck racecheck synccheck; do
  if [[ ! -x "$SANITIZER" ]]; then
    skip "$tool" "compute-sanitizer not found"
    continue
  fi
  filter=()
  "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name" && filter=(--kernel-name kns=lococo)
  step "$tool" "sanitizer_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "${filter[@]}" "$PYTHON" tools/sanitize_case.py
done
finish
