#!/usr/bin/env bash
# Train with accelerate: ./train_gemma3.sh [any scripts/sft_pokemon_gemma3.py flag ...]
# Settings come from .env (read by the Python settings loader, never `export $(cat .env | xargs)`),
# the environment and the flags given here. ACCELERATE_CONFIG picks the accelerate config.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "error: $PY not found; run ./init.sh first" >&2; exit 1; }
CONFIG=$("$PY" -c 'from pokemon_gemma.config import load_settings_or_exit; print(load_settings_or_exit().accelerate_config)')
[ -f "$CONFIG" ] || { echo "error: accelerate config $CONFIG not found (set ACCELERATE_CONFIG in .env)" >&2; exit 1; }

LAUNCH_ARGS=(--config_file "$CONFIG")
case "$CONFIG" in
  *multi_gpu*|*deepspeed*|*fsdp*)
    # Process count from the machine, not the YAML: one process per visible GPU.
    NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
    [ "$NGPU" -ge 1 ] || { echo "error: $CONFIG needs NVIDIA GPUs and nvidia-smi found none" >&2; exit 1; }
    LAUNCH_ARGS+=(--num_processes "$NGPU") ;;
esac
echo "[train] accelerate launch ${LAUNCH_ARGS[*]} scripts/sft_pokemon_gemma3.py $*"
exec "$PY" -m accelerate.commands.launch "${LAUNCH_ARGS[@]}" scripts/sft_pokemon_gemma3.py "$@"
