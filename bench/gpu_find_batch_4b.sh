#!/usr/bin/env bash
# Issue 5 device check: QLoRA batch-size search on the real gemma-3-4b shape (random bf16 weights,
# 4 x 896x896 frames = 1024 image tokens per sample), worst-case demo windows. Results under $OUT.
# About 2-4 minutes on one H100: build + save 8.6 GB of weights, 4-bit load, ~8 probes of 3 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_find_batch_out}; WORK=${WORK:-/tmp/gpu_find_batch}
mkdir -p "$OUT" "$WORK"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
[ -f "$WORK/model/config.json" ] || python bench/make_random_model.py --size 4b --output_dir "$WORK/model"
python scripts/make_demo_sessions.py --output_dir "$WORK/eevee" --sessions 8 --seed 0 --overwrite >/dev/null
python scripts/convert_eevee_data_v2.py --eevee_data_dir "$WORK/eevee" --output_dir "$WORK/data" --copy_images >/dev/null
python scripts/find_batch_size.py --env_file /dev/null --dataset_path "$WORK/data/train.jsonl" \
    --model_name "$WORK/model" --use_qlora --mixed_precision bf16 --max_seq_length 2048 \
    --max_batch_size "${MAX_BATCH:-64}" --probe_steps 3 --target_effective_batch 16 \
    --output "$OUT/bs_gemma3_4b_qlora.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/bs_gemma3_4b_qlora.log"
