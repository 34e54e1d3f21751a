#!/usr/bin/env bash
# Issue 15 device check (NOT run yet): QLoRA batch-size search on the real gemma-4-e2b and gemma-4-e4b
# shapes (random bf16 weights from bench/make_random_model.py, audio tower included as a hub load has it),
# 4 x 240x160 frames at IMAGE_TOKENS (default 280, train_gemma4.sh's: 4 x (260 + 2) = 1048 image tokens
# per sample), worst-case demo windows. Results under $OUT: bs_gemma4_{e2b,e4b}_qlora.{json,log}.
# Budget on one H100/H200: ~1-2 min to build + save each model (10 / 16 GB), then ~8 probes of 3 steps each.
#   bench/gpu_find_batch_gemma4.sh          # or: SIZES=e2b IMAGE_TOKENS=70 MAX_BATCH=32 bench/gpu_find_batch_gemma4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_find_batch_gemma4_out}; WORK=${WORK:-/tmp/gpu_find_batch_gemma4}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ ! -f "$WORK/data/train.jsonl" ]; then
  "$PY" scripts/make_demo_sessions.py --output_dir "$WORK/eevee" --sessions 8 --seed 0 --overwrite >/dev/null
  "$PY" scripts/convert_eevee_data_v2.py --eevee_data_dir "$WORK/eevee" --output_dir "$WORK/data" --copy_images >/dev/null
fi
for size in ${SIZES:-e2b e4b}; do
  [ -f "$WORK/$size/config.json" ] || "$PY" bench/make_random_model.py --size "$size" --output_dir "$WORK/$size"
  "$PY" scripts/find_batch_size.py --env_file /dev/null --dataset_path "$WORK/data/train.jsonl" \
      --model_name "$WORK/$size" --use_qlora --mixed_precision bf16 --image_tokens "${IMAGE_TOKENS:-280}" \
      --max_seq_length 2048 --max_batch_size "${MAX_BATCH:-64}" --probe_steps 3 --target_effective_batch 16 \
      --output "$OUT/bs_gemma4_${size}_qlora.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/bs_gemma4_${size}_qlora.log"
done
