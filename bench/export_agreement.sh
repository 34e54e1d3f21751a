#!/usr/bin/env bash
# Every export of one merged folder (MLX 8/4-bit, GGUF f32/f16/q8_0), each verified against the PyTorch model
# on the same N records of a dataset, and one table of their agreement (the README's table comes from here).
#   bench/export_agreement.sh MERGED_DIR DATA.jsonl OUT_DIR [N=100]
# GGUF needs ./init.sh --gguf. A refused export (exit 1) still gets its row: the table shows FAILED.
set -uo pipefail
cd "$(dirname "$0")/.."
MERGED=${1:?merged folder} DATA=${2:?dataset jsonl} OUT=${3:?output folder} N=${4:-100}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GGUF_THREADS=${GGUF_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
for bits in 8 4; do
  /usr/bin/time -f "mlx_${bits}bit: %e s" "$PY" scripts/convert_to_mlx.py --model_path "$MERGED" \
    --output_path "$OUT/mlx_${bits}bit" --quantization_bits "$bits" --verify_data "$DATA" --verify_samples "$N" \
    --overwrite >"$OUT/mlx_${bits}bit.log" 2>&1
done
for q in f32 f16 q8_0; do
  /usr/bin/time -f "gguf_$q: %e s" "$PY" scripts/convert_to_gguf.py --model_path "$MERGED" --output_dir "$OUT/gguf_$q" \
    --quantization "$q" --verify_data "$DATA" --verify_samples "$N" --overwrite >"$OUT/gguf_$q.log" 2>&1
done
"$PY" -m pokemon_gemma.export.compare "$OUT"/mlx_8bit "$OUT"/mlx_4bit "$OUT"/gguf_f32 "$OUT"/gguf_f16 "$OUT"/gguf_q8_0
