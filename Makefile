# The two set-up commands of the README are `make demo` and `make test`; both install what they need.
PY ?= python3

.PHONY: setup demo test test-fast lint proto bench smoke-arm64

setup:
	./scripts/setup

demo: setup
	edgeshard demo

test: setup
	$(PY) -m pytest -q

# Debian arm64 root under qemu-user: same greedy tokens as this host (scripts/arm64-smoke; cached in
# $EDGESHARD_ARM64_CACHE, default /var/cache/edgeshard-arm64; needs root).
smoke-arm64: setup
	./scripts/arm64-smoke

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff check . && ruff format --check .

proto:
	$(PY) scripts/gen_proto.py

bench:
	$(PY) benchmarks/pipeline.py && $(PY) benchmarks/decode.py
