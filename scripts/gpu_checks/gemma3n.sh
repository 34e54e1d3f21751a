#!/usr/bin/env bash
# Gemma 3n end to end on a tiny random model, for an install where timm + a matching torchvision work
# (this project's CPU torch 2.13 has none: see pokemon_gemma/families/gemma3n.py). Builds the tiny
# Gemma 3n, trains 2 steps through the training CLI, evaluates (score and generate) and merges with
# verification, then prints one PASS/FAIL line per stage. Run from the repository root:
#
#     PYTHON=/path/to/venv-with-torch-2.14.1-torchvision-0.29.1-timm/bin/python scripts/gpu_checks/gemma3n.sh
#
# Measured on the CPU machine in such a venv (torch 2.14.1+cu130 wheels, no GPU): build ~15 s,
# 2 training steps ~12 s. On a GPU machine it uses CUDA where the CLIs pick it.
set -u
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-.}
status=0
stage() {  # stage NAME COMMAND...: run, keep the log, print PASS/FAIL with the log's last line
    local name=$1; shift
    if "$@" >"$OUT/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name: $(tail -1 "$OUT/$name.log")"; status=1; fi
}
stage versions "$PY" -c "import torch, torchvision, timm, transformers; print(torch.__version__, torchvision.__version__, timm.__version__, transformers.__version__, torch.cuda.is_available())"
cat "$OUT/versions.log"
stage data "$PY" -c "from pathlib import Path; from tests.helpers import write_dataset as w; d=Path('$OUT/data'); d.mkdir(); w(d, 8, seed=0); w(d, 4, seed=1, name='val.jsonl')"
stage build "$PY" scripts/make_tiny_model.py --family gemma3n --output_dir "$OUT/tiny"
stage train "$PY" scripts/sft_pokemon_gemma3.py --model_name "$OUT/tiny" --dataset_path "$OUT/data/train.jsonl" \
    --eval_dataset_path "$OUT/data/val.jsonl" --output_dir "$OUT/run" --batch_size 2 --grad_accum 1 \
    --learning_rate 1e-3 --logging_steps 1 --eval_steps 0 --seed 7 --max_steps 2
stage eval_score "$PY" scripts/evaluate.py --model_name "$OUT/run" --dataset_path "$OUT/data/val.jsonl" \
    --output_dir "$OUT/eval_score" --no_progress
stage eval_generate "$PY" scripts/evaluate.py --model_name "$OUT/run" --dataset_path "$OUT/data/val.jsonl" \
    --output_dir "$OUT/eval_generate" --mode generate --max_new_tokens 24 --no_progress
stage merge "$PY" scripts/merge_qlora.py --base_model "$OUT/tiny" --lora_path "$OUT/run" --output_path "$OUT/merged" \
    --dtype fp32 --verify_samples 2
echo "logs: $OUT"
exit $status
