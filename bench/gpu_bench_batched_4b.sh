#!/usr/bin/env bash
# Issue 18 device check (NOT run yet): batched scoring on the real gemma-3-4b shape (random bf16
# weights, 4 x 896x896 frames = 1024 image tokens per request). Results under $OUT:
#   bench_serve.json/.png/.log: requests/s and p50/p99 for 1 and 8 concurrent agents; the score-mode
#     p50 with all 4 frames encoded ("independent score, 1 client") and with 3 of 4 frames cached
#     ("session stream, cache on"), to hold against the ~40 ms / ~19 ms FLOP bounds of issue 18;
#   bench_eval.json/.log: evaluation samples/s, batch 1 vs 8 vs 16, and the largest probability
#     difference between batched and one-at-a-time scoring (bf16: expect ~1e-3, not the fp32 1e-5).
# Budget: ~2 min to build and save 8.6 GB of weights, then ~4-6 min of benches on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench_batched_out}; WORK=${WORK:-/tmp/gpu_bench_batched}
mkdir -p "$OUT" "$WORK"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
[ -f "$WORK/model/config.json" ] || python bench/make_random_model.py --size 4b --output_dir "$WORK/model"
python bench/bench_serve.py --model_path "$WORK/model" --precision bf16 --clients 1,8 --requests 32 --repeats 1 \
    --generate_requests 2 --max_new_tokens 16 --stream 24 --max_batch 16 --output_dir "$OUT" 2>&1 \
    | tee "$OUT/bench_serve.log"
python bench/bench_eval.py --model_path "$WORK/model" --precision bf16 --samples 32 --batch_sizes 1,8,16 --repeats 1 \
    --output_dir "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench_eval.log"
grep -E "independent score, 1 client|session stream, cache on" "$OUT/bench_serve.log" \
    | sed 's/^/score-mode p50 vs FLOP bound (4 frames encoded ~40 ms; 3 of 4 cached ~19 ms): /'
