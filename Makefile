# The two set-up commands of the README are `make demo` and `make test`; both install what they need.
PY ?= python3
# `make demo` installs into a project virtualenv (never the system Python: PEP 668 distributions such as
# Raspberry Pi OS refuse that). VENV_FLAGS=--system-site-packages reuses a torch the system already has.
VENV ?= .venv
VENV_FLAGS ?=

.PHONY: setup demo test test-fast lint proto bench smoke-arm64

setup:
	./scripts/setup

$(VENV)/bin/python:
	$(PY) -m venv $(VENV_FLAGS) $(VENV)

demo: $(VENV)/bin/python
	PYTHON=$(VENV)/bin/python ./scripts/setup --no-test-extras
	$(VENV)/bin/edgeshard demo

test: setup
	$(PY) -m pytest -q

# Debian arm64 root under qemu-user: same greedy tokens as this host (scripts/arm64-smoke; cached in
# $EDGESHARD_ARM64_CACHE, default /var/cache/edgeshard-arm64; needs root).
smoke-arm64: setup
	./scripts/arm64-smoke

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff check . && ruff format --check . && $(PY) scripts/check_layers.py

proto:
	$(PY) scripts/gen_proto.py

bench:
	$(PY) benchmarks/pipeline.py && $(PY) benchmarks/decode.py
