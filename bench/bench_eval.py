#!/usr/bin/env python
"""Benchmark score-mode evaluation: samples/s of one sample per model call against batched calls
(`evaluate.predict(..., batch_size=B)`: one prompt pass and one answer pass per batch), side by side
in one run, interleaved over --repeats rounds (the median round is reported), with the largest
probability difference between the batched and the one-at-a-time predictions.

The samples are 4-frame windows of synthetic Game Boy frames with contexts of mixed lengths (so
batched prompts are padded); the model is the tiny random Gemma 3 unless --model_path is given
(e.g. a random-weight gemma-3-4b from bench/make_random_model.py on a GPU, with --precision bf16).

    python bench/bench_eval.py [--model_path DIR] [--samples 48] [--batch_sizes 1,4,8,16] [--repeats 3]
                               [--precision no|bf16|fp16] [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

CONTEXTS = [
    "",
    "Goal: reach the door.",
    "Goal: talk to the villager by the pond, then walk back to the house. " * 4,
    "Goal: find the exit of the forest.",
]


def write_samples(folder: Path, n: int) -> Path:
    """n JSONL records over one synthetic frame stream (window i = frames i..i+3)."""
    from pokemon_gemma.dataset import BUTTONS, QUESTION, make_output
    from pokemon_gemma.serve.client import synthetic_frame

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n + 3):
        path = folder / f"frame_{i:04d}.png"
        synthetic_frame(i).save(path)
        paths.append(str(path))
    rows = [
        {
            "frames": paths[i : i + 4],
            "context": CONTEXTS[i % len(CONTEXTS)],
            "question": QUESTION,
            "output": make_output(BUTTONS[i % len(BUTTONS)]),
            "metadata": {"session_id": "bench", "turns": [i + 4]},
        }
        for i in range(n)
    ]
    out = folder / "samples.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run(args) -> dict:
    import torch

    from pokemon_gemma.backends import load_backend
    from pokemon_gemma.collate import FrameLoader
    from pokemon_gemma.dataset import BUTTONS, load_records
    from pokemon_gemma.evaluate import predict

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    model_path = args.model_path
    if model_path is None:
        from pokemon_gemma.tiny import build_tiny_model

        model_path = str(build_tiny_model(work / "tiny", seed=0))
    records = load_records(write_samples(work / "data", args.samples))
    backend = load_backend(model_path, precision=args.precision)
    frames = FrameLoader(cache_size=4 * len(records))  # decoded once: the model's time is measured
    sizes = sorted(set(args.batch_sizes) | {1})
    predict(backend, records[: max(sizes)], "score", batch_size=max(sizes), progress=False, frame_loader=frames)
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    probabilities: dict[int, list[dict]] = {}
    for _ in range(args.repeats):
        for b in sizes:
            start = time.perf_counter()
            preds, _ = predict(backend, records, "score", batch_size=b, progress=False, frame_loader=frames)
            seconds[b].append(time.perf_counter() - start)
            probabilities[b] = [p.probabilities for p in preds]
    results: dict = {
        "model_path": model_path,
        "backend": backend.name,
        "batched_scoring": backend.batched_scoring,
        "samples": len(records),
        "repeats": args.repeats,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "batch_sizes": {},
    }
    for b in sizes:
        median = statistics.median(seconds[b])
        worst = max(abs(p[k] - q[k]) for p, q in zip(probabilities[b], probabilities[1]) for k in BUTTONS)
        results["batch_sizes"][str(b)] = {
            "samples_per_s": len(records) / median,
            "seconds_per_round": seconds[b],
            "max_probability_diff_vs_batch_1": worst,
        }
    one = results["batch_sizes"]["1"]["samples_per_s"]
    for row in results["batch_sizes"].values():
        row["speedup_vs_batch_1"] = row["samples_per_s"] / one
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="model folder (default: a tiny random Gemma 3)")
    parser.add_argument("--samples", type=int, default=48, help="samples evaluated per round and batch size")
    parser.add_argument(
        "--batch_sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 8, 16],
        help="comma-separated batch sizes (1 is always measured: the one-at-a-time reference)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median round is reported")
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="model weights dtype")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output_dir", default=None, help="also write bench_eval.json here")
    args = parser.parse_args(argv)
    if min(args.samples, args.repeats, *args.batch_sizes) < 1:
        parser.error("--samples, --repeats and every --batch_sizes value must be >= 1")
    results = run(args)
    print(
        f"score-mode evaluation, {results['samples']} samples, {results['backend']} backend, median of "
        f"{results['repeats']} interleaved rounds (load average {results['load_average'][0]:.1f})"
    )
    for b, row in results["batch_sizes"].items():
        print(
            f"  batch {b:>3}: {row['samples_per_s']:7.2f} samples/s  {row['speedup_vs_batch_1']:5.2f}x one at a time  "
            f"max |p - p(batch 1)| {row['max_probability_diff_vs_batch_1']:.1e}"
        )
    if args.output_dir:
        from pokemon_gemma.fileio import atomic_write_json

        out = Path(args.output_dir)
        atomic_write_json(out / "bench_eval.json", results)
        print(f"wrote {out / 'bench_eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
