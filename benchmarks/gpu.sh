#!/usr/bin/env bash
# One command for a GPU machine (about 8 minutes on one H200), results under benchmarks/results/gpu/:
#   1. make install (the repository's own pins; nothing else is downloaded, no weights)
#   2. the CUDA tests (pytest -m cuda)
#   3. benchmarks/gpu_run.py: Taylor gradient pass in bf16 with its peak memory, prune SmolLM2 20%, one
#      epoch of Alpaca-cleaned 5k per recovery (LoRA, distil + LoRA, distil full weights) in bf16, perplexity
#   4. prefill/decode throughput in bf16 with benchmarks/decode.py, when that script is present
# `--dry-run`: the same steps on CPU with tiny sizes (no install, CUDA tests only collected), into a
# temporary directory (or $GPU_SH_OUT); the test suite runs it so this script cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FXPRUNE_DATA_DIR="${FXPRUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
if [ "$DRY" = 1 ]; then
  OUT="${GPU_SH_OUT:-$(mktemp -d)}"
else
  OUT=benchmarks/results/gpu
fi
mkdir -p "$OUT"
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_sh.log"; }

if [ "$DRY" = 1 ]; then
  log "dry run: no install; CUDA tests collected only"
  $PY -m pytest -q -m cuda --collect-only -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda_tests.txt"
else
  log "make install"
  make install PYTHON="$PY"
  log "CUDA tests"
  $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
fi

log "recovery and gradient-pass run"
if [ "$DRY" = 1 ]; then
  $PY -m benchmarks.gpu_run --dry-run --out "$OUT"
else
  $PY -m benchmarks.gpu_run --out "$OUT"
fi

if [ -f benchmarks/decode.py ]; then
  if [ "$DRY" = 1 ]; then
    log "decode throughput: benchmarks/decode.py present; dry run checks that it parses its options"
    $PY -m benchmarks.decode --help > /dev/null
  else
    log "decode throughput (bf16)"
    $PY -m benchmarks.decode --device cuda --dtype bfloat16 --modes eager --out "$OUT/decode"
  fi
else
  log "decode throughput skipped: benchmarks/decode.py is not in this checkout"
fi
log "done: results in $OUT"
