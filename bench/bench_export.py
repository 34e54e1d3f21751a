#!/usr/bin/env python
"""Benchmark MLX exports of one merged Gemma 3 folder side by side: unquantised, 8-bit and 4-bit.

For each variant, in one run: weights size on disk (and its ratio to the source), conversion time,
8-button scoring latency p50 of the MLX export vs PyTorch float32 on the same fixed 4-frame samples
(and their ratio), and how often the export picks PyTorch's button (without token_type_ids, i.e.
causal image attention like mlx-vlm; and with them, as in training). Without --model_path a tiny
random Gemma 3 is built (its 64-wide rows make 4-bit far coarser than on a real model).

    python bench/bench_export.py [--model_path models/pokemon-gemma-merged] [--samples 16] [--bits none,8,4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _p50_ms(fn, samples) -> tuple[float, list[str]]:
    r = samples[0].record
    fn(samples[0].frames, r.context, r.question)  # warm-up (graph compilation, caches)
    times, buttons = [], []
    for s in samples:
        t0 = time.perf_counter()
        out = fn(s.frames, s.record.context, s.record.question)
        times.append(time.perf_counter() - t0)
        buttons.append(out.button)
    return 1000 * statistics.median(times), buttons


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="merged Gemma 3 folder (default: a tiny random one)")
    parser.add_argument("--samples", type=int, default=16, help="fixed demo samples scored per variant (default 16)")
    parser.add_argument("--bits", default="none,8,4", help="comma-separated variants: none, 8, 4 (default all)")
    parser.add_argument("--group_size", type=int, default=64, help="quantisation group size (default 64)")
    args = parser.parse_args(argv)

    from pokemon_gemma.backends.mlx_backend import MlxButtonScorer
    from pokemon_gemma.collate import Collator
    from pokemon_gemma.export import export_mlx, fixed_samples
    from pokemon_gemma.export.common import weights_bytes
    from pokemon_gemma.modeling import load_model, load_processor
    from pokemon_gemma.scoring import ButtonScorer

    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    source = Path(args.model_path) if args.model_path else None
    if source is None:
        from pokemon_gemma.tiny import build_tiny_model

        source = build_tiny_model(work / "tiny", seed=0)
    samples = fixed_samples(args.samples)
    collator = Collator(load_processor(str(source)), max_seq_length=8192)
    pt = load_model(str(source), precision="fp32").eval()
    pt_ms, pt_causal = _p50_ms(ButtonScorer(pt, collator, causal_images=True).score, samples)
    _, pt_bidir = _p50_ms(ButtonScorer(pt, collator).score, samples)
    src_mb = weights_bytes(source) / 1e6

    rows = []
    for bits_text in args.bits.split(","):
        bits = None if bits_text.strip() == "none" else int(bits_text)
        out = work / f"mlx_{bits_text.strip()}"
        t0 = time.perf_counter()
        export_mlx(source, out, quantization_bits=bits, group_size=args.group_size, verify=False)
        convert_s = time.perf_counter() - t0
        mlx_ms, mlx_buttons = _p50_ms(MlxButtonScorer(out).score, samples)
        mb = weights_bytes(out) / 1e6
        agree_c = sum(a == b for a, b in zip(mlx_buttons, pt_causal)) / len(samples)
        agree_b = sum(a == b for a, b in zip(mlx_buttons, pt_bidir)) / len(samples)
        rows.append((bits_text.strip(), mb, mb / src_mb, convert_s, mlx_ms, pt_ms, mlx_ms / pt_ms, agree_c, agree_b))

    print(
        f"source: {source} ({src_mb:.1f} MB of weights); {len(samples)} fixed samples; PyTorch float32 "
        f"scoring p50 {pt_ms:.1f} ms"
    )
    print(
        f"{'bits':>5} {'MB':>8} {'size/src':>8} {'convert s':>9} {'MLX p50 ms':>10} {'PT p50 ms':>9} "
        f"{'MLX/PT':>6} {'agree(causal)':>13} {'agree(tti)':>10}"
    )
    for name, mb, ratio, conv, mlx_ms, pt_p50, lat_ratio, ac, ab in rows:
        print(
            f"{name:>5} {mb:>8.2f} {ratio:>8.2f} {conv:>9.1f} {mlx_ms:>10.1f} {pt_p50:>9.1f} {lat_ratio:>6.2f} "
            f"{ac:>13.1%} {ab:>10.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
