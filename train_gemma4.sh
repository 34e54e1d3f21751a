#!/usr/bin/env bash
# Train Gemma 4 (E2B default; also e4b-it, 26B-A4B-it, 31B-it via --model_name). --image_tokens 70|140|280|560|1120 sets the soft tokens per image (default 280).
# A thin wrapper over train_gemma3.sh (same settings, accelerate config and flags); flags given here win.
set -euo pipefail
cd "$(dirname "$0")"
exec ./train_gemma3.sh --model_name "${MODEL_NAME:-google/gemma-4-e2b-it}" --image_tokens "${IMAGE_TOKENS:-280}" "$@"
