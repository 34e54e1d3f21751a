#!/usr/bin/env bash
# Train Gemma 3n (E2B default; also E4B-it). Needs timm and a torchvision built for the installed torch: GPU installs only (scripts/gpu_checks/gemma3n.sh checks one).
# A thin wrapper over train_gemma3.sh (same settings, accelerate config and flags); flags given here win.
set -euo pipefail
cd "$(dirname "$0")"
exec ./train_gemma3.sh --model_name "${MODEL_NAME:-google/gemma-3n-E2B-it}"  "$@"
