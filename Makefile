# The two commands of a fresh machine: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test bench wheels clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m lococo assets fetch
	$(PY) -m lococo demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_fuse_kv.py

wheels:
	bash scripts/build_wheels.sh

clean:
	rm -rf build python/lococo/_C*.so python/lococo/_version.py
