#!/usr/bin/env python
"""Tiny Gemma 3 vs tiny Gemma 4 with our training loop, side by side in one run: prompt length and speed.

The models come from the tiny random builders `scripts/make_tiny_model.py --family gemma3|gemma4`
uses (and demo.sh): `gemma3` as the demo builds it (64 px, 16 soft tokens per image), `gemma3-256`
the same builder at 128 px with the real Gemma 3's 256 soft tokens per image (its prompt length),
and `gemma4` at make_tiny_model's default budget of 70 (60 soft tokens per 240x160 frame, what the
real E2B gives at 70). Each trains a LoRA adapter (language targets) with pokemon_gemma.train on
the SAME demo windows (pokemon_gemma.demo + the converter), with the same steps, batch, learning
rate, seed and torch threads, each run in its own fresh child process (bench/bench_train.py's data
preparation and child runner, imported). Printed per model: tokens per training sample (mean;
prompt + answer, every image soft token counted) and the image soft tokens' share of them,
training samples/s over the whole loop (data loading and collation included) by the wall clock
and per CPU-second of the trainer process (the steadier figure on a shared machine), peak RSS,
train loss, held-out accuracy (a sanity check: the models are random and the run is short); then
the ratios gemma4/gemma3 and gemma4/gemma3-256.

The tiny models' text stacks are toy-sized, so the speed ratio says how the prompt lengths and the
two architectures compare in a loop this small, not what a real E2B costs against a real 4b (that
takes a GPU: bench/gpu_find_batch_gemma4.sh).

    python bench/bench_families.py [--steps 30] [--batch_size 4] [--threads 1] [--sessions 40] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import majority_share, prepare, run_child, summarise  # noqa: E402

from pokemon_gemma.fileio import atomic_write_json  # noqa: E402

# name -> (family, the builder's arguments); "gemma3" is bench_train's (and demo.sh's) tiny Gemma 3.
VARIANTS = {
    "gemma3": ("gemma3", None),
    "gemma3-256": ("gemma3", {"image_size": 128, "mm_tokens_per_image": 256}),
    "gemma4": ("gemma4", {"max_soft_tokens": 70}),  # make_tiny_model.py's default budget
}
BASELINES = ("gemma3", "gemma3-256")  # what gemma4 is compared with


def build_models(work: Path) -> dict[str, Path]:
    """The tiny model of each variant (bench_train's prepare() already wrote the demo's Gemma 3)."""
    from pokemon_gemma.families import get_family

    paths = {}
    for name, (family, kwargs) in VARIANTS.items():
        paths[name] = work / ("tiny" if kwargs is None else f"tiny-{name}")
        if kwargs is not None and not (paths[name] / "config.json").is_file():
            get_family(family).build_tiny(paths[name], seed=0, **kwargs)
    return paths


def prompt_stats(model: Path, train_jsonl: Path) -> dict:
    """Mean tokens per training sample (prompt + answer, images expanded) and image soft tokens per sample."""
    from pokemon_gemma.collate import Collator
    from pokemon_gemma.dataset import load_records
    from pokemon_gemma.modeling import load_processor

    collator = Collator(load_processor(str(model)), max_seq_length=1 << 20)
    lengths, soft = [], []
    for r in load_records(train_jsonl):
        text = collator.prompt_text(r.context, r.question) + collator.answer_text(r.output)
        ids = collator.expanded_ids(text, collator.record_sizes(r))
        lengths.append(len(ids))
        soft.append(ids.count(collator.image_token_id))
    return {
        "tokens": statistics.mean(lengths),
        "image_tokens": statistics.mean(soft),
        "per_image": soft[0] / collator.n_images,
        "samples": len(lengths),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per model (default: 30)")
    parser.add_argument("--batch_size", type=int, default=4, help="micro-batch size (default: 4)")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in each child (default: 1)")
    parser.add_argument(
        "--learning_rate", type=float, default=2e-3, help="peak learning rate, cosine schedule (default: 2e-3)"
    )
    parser.add_argument("--seed", type=int, default=42, help="training seed for every model (default: 42)")
    parser.add_argument(
        "--sessions", type=int, default=40, help="demo sessions generated (about 7 windows each; default: 40)"
    )
    parser.add_argument(
        "--eval_samples", type=int, default=32, help="held-out windows scored per run (0 = all; default: 32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per model, interleaved; ratios use the medians (default: 1)"
    )
    parser.add_argument(
        "--work_dir",
        default=str(Path(tempfile.gettempdir()) / "pokemon_gemma_bench_families"),
        help="tiny models + data are generated here once and reused",
    )
    parser.add_argument("--json", default="", help="also write all measurements to this JSON file")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "threads", "repeats", "sessions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.eval_samples < 0:
        parser.error("--eval_samples must be 0 (all) or more")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"preparing tiny Gemma 3 / Gemma 4 and {args.sessions} demo sessions under {work} ...", flush=True)
    prepare(work, args.sessions, seed=0)
    models = build_models(work)
    train = work / "data" / "train.jsonl"
    stats = {name: prompt_stats(models[name], train) for name in VARIANTS}
    per_step = args.batch_size * args.grad_accum
    if stats["gemma3"]["samples"] < per_step:
        parser.error(f"{stats['gemma3']['samples']} training windows < one step ({per_step}); raise --sessions")
    base = {
        "work": str(work),
        "train": str(train),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "threads": args.threads,
        "learning_rate": args.learning_rate,
        "warmup_ratio": 0.03,
        "seed": args.seed,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "eval_samples": args.eval_samples,
    }
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for rep in range(args.repeats):
        for name in VARIANTS:
            head = f"=== {name} (run {rep + 1}/{args.repeats}): {args.steps} steps x {per_step} samples ==="
            print(f"\n{head}", flush=True)
            out = work / f"out-{name}-{rep}"
            cfg = {**base, "model": str(models[name]), "out": str(out)}
            runs[name].append(run_child("ours", cfg, f"{name}-{rep}"))
    sums = {f: [summarise(r, per_step) for r in v] for f, v in runs.items()}
    report(args, stats, sums, work)
    if args.json:
        atomic_write_json(args.json, {"config": base, "prompt": stats, "runs": runs, "summary": sums})
    return 0


def report(args, stats: dict, sums: dict, work: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"LoRA (language) with pokemon_gemma.train on {stats['gemma3']['samples']} demo train windows "
        f"(4 frames each): {args.steps} steps x batch {args.batch_size} x accum {args.grad_accum}, "
        f"lr {args.learning_rate:g}, seed {args.seed}, {args.threads} torch thread(s); each run a fresh process"
    )
    columns = ("model", "run", "soft tokens / image", "tokens / sample (image share)", "samples/s (wall)")
    columns += ("load avg", "samples per CPU-s", "peak RSS MB", "train loss step 1 -> last 5", "held-out acc")
    for col in columns:
        table.add_column(col, justify="right")
    for name in VARIANTS:
        st = stats[name]
        for i, m in enumerate(sums[name]):
            table.add_row(
                name,
                str(i + 1),
                f"{st['per_image']:.0f}",
                f"{st['tokens']:.0f} ({st['image_tokens'] / st['tokens']:.0%})",
                f"{m['sps']:.2f}",
                f"{m['load']:.1f}",
                f"{m['sps_cpu']:.2f}",
                f"{m['rss']:.0f}",
                f"{m['loss0']:.3f} -> {m['loss1']:.3f}",
                f"{m['acc']:.3f}",
            )
    Console(width=170).print(table)

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in sums[name])

    g4 = stats["gemma4"]
    for base in BASELINES:
        g3 = stats[base]

        def ratio(key: str, base=base) -> float:
            return med("gemma4", key) / med(base, key)

        print(
            f"gemma4/{base}: tokens per sample {g4['tokens'] / g3['tokens']:.2f}x ({g4['tokens']:.0f} vs "
            f"{g3['tokens']:.0f}; image soft tokens {g4['image_tokens']:.0f} vs {g3['image_tokens']:.0f}), "
            f"samples/s (wall) {ratio('sps'):.2f}x, samples per CPU-second {ratio('sps_cpu'):.2f}x "
            f"(without step 1: {ratio('sps_cpu_steady'):.2f}x), peak RSS {ratio('rss'):.2f}x"
        )
    print(f"majority-button baseline on the held-out windows: {majority_share(work, args.eval_samples):.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
