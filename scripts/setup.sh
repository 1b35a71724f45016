#!/usr/bin/env bash
# Idempotent set-up of a development checkout: .venv, torch, the Python dependencies, and an
# incremental build of lococo._C. Safe to run again; a second run does only what changed.
#
#   LOCOCO_TORCH   torch version to install (default 2.14.1, a CUDA 13.0 build; 2.13.0 is CPU-only)
#   LOCOCO_CUDA    auto|0|1: build the CUDA kernels (auto: when torch is a CUDA build and nvcc exists)
#   PYTHON         interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${LOCOCO_TORCH:-2.14.1}
VENV_PY=.venv/bin/python

[ -x "$VENV_PY" ] || "$PYTHON" -m venv .venv
pip_install() { "$VENV_PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$VENV_PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi
pip_install -r requirements-dev.txt

# The package is used from the source tree (python/): a .pth file instead of `pip install -e`,
# which would rebuild the extension from scratch on every run.
site=$("$VENV_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$(pwd)/python" > "$site/lococo-src.pth"
# ... so pip writes no console script either: write .venv/bin/lococo from pyproject.toml's [project.scripts]
"$VENV_PY" scripts/install_entry_points.py

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "setup: building lococo._C (incremental; log in build/setup.log)"
mkdir -p build
if ! "$VENV_PY" setup.py build_ext --inplace > build/setup.log 2>&1; then
  tail -n 60 build/setup.log
  echo "setup: the build failed; full log in build/setup.log" >&2
  exit 1
fi
"$VENV_PY" -m lococo.info --short
