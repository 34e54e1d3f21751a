#!/usr/bin/env bash
# Multi-GPU checks (2+ CUDA GPUs, a few minutes, nothing downloaded): the tiny Gemma 3 under
# multi_gpu.yaml (DDP reference), fsdp.yaml and deepspeed_zero3.yaml (each SIGKILLed after checkpoint-2,
# then resumed), and fsdp.yaml in its own bf16; adapters compared with DDP's. See bench/gpu_checks_multi.py.
#   bench/gpu_checks_multi.sh            # or: OUT=/tmp/x NPROC=4 bench/gpu_checks_multi.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_checks_multi_out}; WORK=${WORK:-/tmp/gpu_checks_multi}
mkdir -p "$OUT" "$WORK"
unset MIXED_PRECISION  # fsdp.yaml's own precision is one of the checks
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
"$PY" -c "import torch; n = torch.cuda.device_count(); assert n >= 2, f'needs 2+ CUDA GPUs, found {n}'; print('torch', torch.__version__, n, 'x', torch.cuda.get_device_name(0))"
[ -f "$WORK/tiny/config.json" ] || "$PY" scripts/make_tiny_model.py --output_dir "$WORK/tiny"
if [ ! -f "$WORK/data/val.jsonl" ]; then
  "$PY" -c "import sys; from pathlib import Path; from tests.helpers import write_dataset as w; d = Path(sys.argv[1]); w(d, 24, seed=0); w(d, 8, seed=1, name='val.jsonl')" "$WORK/data"
fi
"$PY" bench/gpu_checks_multi.py --model_dir "$WORK/tiny" --data_dir "$WORK/data" --output_dir "$OUT" \
    --nproc "${NPROC:-0}" 2>&1 | tee "$OUT/gpu_checks_multi.log"
