#!/usr/bin/env bash
# Train with accelerate: ./train_gemma3.sh [any scripts/sft_pokemon_gemma3.py flag ...]
# Settings come from .env (read by the Python settings loader, never `export $(cat .env | xargs)`),
# the environment and the flags given here. ACCELERATE_CONFIG picks the accelerate config.
# GPU multi-process configs get one process per GPU that CUDA_VISIBLE_DEVICES leaves visible.
# Multi-node (run this on every machine, same config): NUM_MACHINES=2 MACHINE_RANK=0|1
#   MAIN_PROCESS_IP=<address of machine 0> [MAIN_PROCESS_PORT=29500] ./train_gemma3.sh ...
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "error: $PY not found; run ./init.sh first" >&2; exit 1; }
CONFIG=$("$PY" -c 'from pokemon_gemma.config import load_settings_or_exit; print(load_settings_or_exit().accelerate_config)')
[ -f "$CONFIG" ] || { echo "error: accelerate config $CONFIG not found (set ACCELERATE_CONFIG in .env)" >&2; exit 1; }

NUM_MACHINES=${NUM_MACHINES:-1}
# Pre-flight: accelerate's own loader reads the config; GPUs are counted the way CUDA will see them
# (CUDA_VISIBLE_DEVICES); a launch that cannot work is refused here in one line, before any process starts.
PLAN=$("$PY" -m pokemon_gemma.distributed "$CONFIG" --num_machines "$NUM_MACHINES") || exit 1
LAUNCH_ARGS=(--config_file "$CONFIG")
read -r -a EXTRA <<< "$PLAN"
LAUNCH_ARGS+=("${EXTRA[@]}")
if [ "$NUM_MACHINES" -gt 1 ]; then
  : "${MACHINE_RANK:?set MACHINE_RANK (0 on the main machine) for a multi-node run}"
  : "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP (the address of machine 0) for a multi-node run}"
  LAUNCH_ARGS+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP"
                --main_process_port "${MAIN_PROCESS_PORT:-29500}")
fi
echo "[train] accelerate launch ${LAUNCH_ARGS[*]} scripts/sft_pokemon_gemma3.py $*"
exec "$PY" -m accelerate.commands.launch "${LAUNCH_ARGS[@]}" scripts/sft_pokemon_gemma3.py "$@"
