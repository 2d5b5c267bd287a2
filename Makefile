# The two set-up commands of the README are `make demo` and `make test`; both install what they need.
PY ?= python3

.PHONY: setup demo test test-fast lint proto bench

setup:
	./scripts/setup

demo: setup
	edgeshard demo

test: setup
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff check . && ruff format --check . && $(PY) scripts/check_layers.py

proto:
	$(PY) scripts/gen_proto.py

bench:
	$(PY) benchmarks/pipeline.py && $(PY) benchmarks/decode.py
