# The two commands of a fresh machine: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m lococo.showcase

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_fuse_kv.py

clean:
	rm -rf build python/lococo/_C*.so python/lococo/_version.py
