#!/usr/bin/env bash
# GPU checks for training beyond one device, on one H100/H200 in about 6-8 minutes, nothing downloaded:
# random-weight gemma-3-4b with the real config (bench/make_random_model.py), 4 frames at 896x896, batch 1.
# Ours vs TRL's SFTTrainer (LoRA bf16 and QLoRA): peak memory, samples/s, tokens/s; single_gpu.yaml's
# resolved precision (must be bf16 from the accelerate config); a 1-GPU FSDP run with a resume.
# Results under $OUT (gpu_checks.json, one log per run). STEPS (default 12) optimizer steps per run.
#   bench/gpu_checks.sh            # or: OUT=/tmp/x STEPS=8 bench/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_checks_out}; WORK=${WORK:-/tmp/gpu_checks}
mkdir -p "$OUT" "$WORK"
unset MIXED_PRECISION  # single_gpu.yaml's own precision is one of the checks
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
[ -f "$WORK/model/config.json" ] || "$PY" bench/make_random_model.py --size 4b --output_dir "$WORK/model"
if [ ! -f "$WORK/data/train.jsonl" ]; then
  "$PY" scripts/make_demo_sessions.py --output_dir "$WORK/eevee" --sessions 8 --seed 0 --overwrite >/dev/null
  "$PY" scripts/convert_eevee_data_v2.py --eevee_data_dir "$WORK/eevee" --output_dir "$WORK/data" --copy_images >/dev/null
fi
PYTHON="$PY" "$PY" bench/gpu_checks.py --model_dir "$WORK/model" --dataset_path "$WORK/data/train.jsonl" \
    --output_dir "$OUT" --steps "${STEPS:-12}" 2>&1 | tee "$OUT/gpu_checks.log"
