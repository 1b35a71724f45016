# The two commands of a fresh machine: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint emulator bench gpu-check wheels clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m lococo assets fetch
	$(PY) -m lococo demo

test: setup lint
	$(PY) -m pytest -q tests
	$(PY) tools/emulator/check_emulated.py --fast

lint: setup
	$(PY) -m ruff check .

# The CUDA kernels run on the CPU against the reference: every check, threads in both orders.
emulator: setup
	$(PY) tools/emulator/check_emulated.py
	$(PY) tools/emulator/check_emulated.py --reverse

# On a machine with an NVIDIA GPU (prints its plan and exits 0 elsewhere).
gpu-check:
	PYTHON=$(abspath $(PY)) bash tools/gpu_check.sh

bench: setup
	$(PY) benchmarks/bench_fuse_kv.py

wheels:
	bash scripts/build_wheels.sh

clean:
	rm -rf build python/lococo/_C*.so python/lococo/_version.py
