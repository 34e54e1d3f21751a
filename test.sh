#!/usr/bin/env bash
# Install (if needed), lint, and run the whole test suite. Extra arguments go to pytest
# (e.g. ./test.sh -m "not slow" for the quick loop; CI runs everything).
set -euo pipefail
cd "$(dirname "$0")"
# --gguf: llama-cpp-python and llama.cpp's converter, so that the GGUF export and backend tests run.
./init.sh --dev --gguf
echo "[test] ruff check + ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One torch thread: two-thread runs stalled intermittently on the 2-core CI machines.
# POKEMON_GEMMA_REQUIRE_GGUF: llama-cpp-python was installed above, so the GGUF tests must run, not skip.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
       WANDB_MODE=offline WANDB_SILENT=true POKEMON_GEMMA_REQUIRE_GGUF=1
exec .venv/bin/python -m pytest -q "$@"
