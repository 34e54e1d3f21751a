#!/usr/bin/env python
"""Benchmark our training loop (pokemon_gemma.train) against TRL's SFTTrainer, side by side in one run.

Both train a LoRA adapter on the same tiny random Gemma 3 (pokemon_gemma.tiny), on the same demo
windows (pokemon_gemma.demo + the converter), with the same batch size, gradient accumulation,
steps, learning rate and schedule, LoRA config, seed, fp32 weights, no gradient checkpointing and
the same number of torch threads. Each trainer runs in its own fresh child process, so peak RSS
(ru_maxrss, read right after training) is not shared. Both trained adapters are then scored with
OUR ButtonScorer (highest-scoring of the 8 full answers) on the same held-out windows, so the
accuracy metric is identical. Printed per run: samples/s over the whole training loop (data loading
and collation included) per CPU-second of the process (the headline: with --threads 1 it is what the
wall clock shows on an idle machine, and other processes disturb it far less) and by the wall clock
(with the 1-minute load average at the end of training: above the core count it is not a trainer
figure), peak RSS (and the peak before the first step: imports + model + data), train loss, held-out
accuracy; then the ratios ours/TRL (medians over --repeats, runs interleaved ours, TRL, ours, ...).

TRL side: prompt/completion conversational data with an `images` column of 4 frame paths
(datasets Image feature), processing_class = the processor, completion_only_loss=True,
max_length=None (nothing truncated). TRL 1.x defaults that differ from ours are overridden and
printed (gradient_checkpointing=True, bf16=True, optim=adamw_torch_fused); its labels are checked
(they must decode to exactly the answer + `<end_of_turn>\\n`: one token more than ours, the newline).
The learning rate defaults to 2e-3 because the tiny model is random; 40 steps are far too few for
either adapter to beat the majority baseline: the accuracy column is a sanity check, not a verdict.

    python bench/bench_train.py [--steps 40] [--batch_size 4] [--grad_accum 1] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pokemon_gemma.fileio import atomic_write_json

REPO = Path(__file__).resolve().parent.parent

TRL_OVERRIDES = {  # TRL 1.x SFTConfig defaults that would make the comparison unequal
    "gradient_checkpointing": False,  # TRL default True; ours off
    "bf16": False,  # TRL default True; ours fp32 (--mixed_precision no)
    "optim": "adamw_torch",  # transformers default adamw_torch_fused; ours torch.optim.AdamW
}


# ----------------------------------------------------------------------------------------------- data
def prepare(work: Path, sessions: int, seed: int) -> dict:
    """Tiny model + demo windows (train.jsonl, held-out = val + test). Reused when already there."""
    from pokemon_gemma.convert import convert_corpus
    from pokemon_gemma.demo import write_demo_sessions
    from pokemon_gemma.tiny import build_tiny_model

    spec = {"sessions": sessions, "seed": seed, "version": 1}
    marker = work / "prepared.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return spec
    for name in ("tiny", "demo", "data"):
        shutil.rmtree(work / name, ignore_errors=True)
    build_tiny_model(work / "tiny", seed=0)
    write_demo_sessions(work / "demo", sessions, seed=seed)
    convert_corpus(work / "demo", work / "data", workers=1, progress=False, warn=lambda _: None)
    marker.write_text(json.dumps(spec))
    return spec


def heldout_records(work: Path, limit: int):
    from pokemon_gemma.dataset import load_records

    records = load_records(work / "data" / "val.jsonl")
    test = work / "data" / "test.jsonl"
    if test.is_file() and test.stat().st_size:
        records += load_records(test)
    return records[:limit] if limit > 0 else records


def majority_share(work: Path, limit: int) -> float:
    from collections import Counter

    from pokemon_gemma.dataset import load_records

    majority = Counter(r.button for r in load_records(work / "data" / "train.jsonl")).most_common(1)[0][0]
    held = heldout_records(work, limit)
    return sum(r.button == majority for r in held) / len(held)


# ----------------------------------------------------------------------------------------------- children
def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _peak_rss_mb() -> float:
    """Peak resident set of this process so far (the trainer's own child: nothing shared)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def score_adapter(work: Path, adapter: Path, limit: int, base_model: str = "") -> dict:
    """Held-out button accuracy of an adapter with OUR scorer (same code for both trainers)."""
    from pokemon_gemma.collate import Collator
    from pokemon_gemma.modeling import load_for_inference, load_processor
    from pokemon_gemma.scoring import ButtonScorer

    records = heldout_records(work, limit)
    base_model = base_model or str(work / "tiny")
    model, _ = load_for_inference(base_model, str(adapter), device="cpu")
    collator = Collator(load_processor(base_model), max_seq_length=1 << 20)
    scorer = ButtonScorer(model, collator)
    correct = sum(scorer.score_record(r).button == r.button for r in records)
    return {"accuracy": correct / len(records), "heldout": len(records)}


def child_ours(cfg: dict) -> dict:
    _threads(cfg["threads"])
    import pokemon_gemma.train as T
    from pokemon_gemma.config import Settings

    out = Path(cfg["out"])
    model = cfg.get("model") or str(Path(cfg["work"]) / "tiny")  # bench_families.py passes each family's
    s = Settings(
        model_name=model,
        dataset_path=cfg["train"],
        eval_dataset_path="",
        output_dir=str(out),
        max_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        grad_accum=cfg["grad_accum"],
        learning_rate=cfg["learning_rate"],
        warmup_ratio=cfg["warmup_ratio"],
        weight_decay=0.0,
        lr_scheduler="cosine",
        lora_r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        lora_targets="language",
        mixed_precision="no",
        gradient_checkpointing=False,
        max_grad_norm=1.0,
        seed=cfg["seed"],
        eval_steps=0,
        save_steps=0,
        logging_steps=1,
        report_to="none",
    )
    # train() opens a fresh throughput window before the loop and after every logged step
    # (logging_steps=1): stamping those calls gives each optimizer step's wall and CPU time.
    marks, start_rss = [], []
    new_window = T.new_window

    def stamped_window():
        if not marks:
            start_rss.append(_peak_rss_mb())
        marks.append((time.perf_counter(), time.process_time()))
        return new_window()

    T.new_window = stamped_window
    t0 = time.perf_counter()
    T.train(s)
    wall = time.perf_counter() - t0
    rss = _peak_rss_mb()
    if len(marks) != cfg["steps"] + 1:
        raise SystemExit(
            f"error: expected {cfg['steps'] + 1} throughput windows from pokemon_gemma.train, "
            f"got {len(marks)} (train.py changed: update bench/bench_train.py)"
        )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    step_times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu_times = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    return {
        "step_times": step_times,
        "cpu_times": cpu_times,
        "losses": losses,
        "peak_rss_mb": rss,
        "start_rss_mb": start_rss[0],
        "wall_s": wall,
        "load": os.getloadavg()[0],
        **score_adapter(Path(cfg["work"]), out, cfg["eval_samples"], model),
    }


def trl_dataset(records, collator):
    """Prompt/completion conversational rows; TRL inserts one image placeholder per `images` entry."""
    from datasets import Dataset, Image, List

    rows = {
        "prompt": [[{"role": "user", "content": collator.user_text(r.context, r.question)}] for r in records],
        "completion": [[{"role": "assistant", "content": r.output.strip()}] for r in records],
        "images": [list(r.frames) for r in records],
    }
    return Dataset.from_dict(rows).cast_column("images", List(Image()))


def check_trl_labels(trainer, dataset, records, collator) -> dict:
    """TRL's labels for 2 samples must decode to exactly the answer + <end_of_turn>\\n (completion only)."""
    batch = trainer.data_collator([dataset[0], dataset[1]])
    tok = collator.tokenizer
    out = {"token_type_ids": "token_type_ids" in batch, "labelled_tokens": [], "labels_ok": True}
    for i in range(2):
        labels = batch["labels"][i]
        ids = labels[labels != -100]
        out["labelled_tokens"].append(int(ids.numel()))
        text = tok.decode(ids)
        if text != records[i].output.strip() + "<end_of_turn>\n":
            out["labels_ok"] = False
            out["bad_label_text"] = text[:120]
        n_soft = int((batch["input_ids"][i] == collator.image_token_id).sum())
        if n_soft != 4 * collator.tokens_per_image:
            out["labels_ok"] = False
            out["bad_image_tokens"] = n_soft
    return out


def child_trl(cfg: dict) -> dict:
    _threads(cfg["threads"])
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pokemon_gemma.collate import Collator
    from pokemon_gemma.dataset import load_records
    from pokemon_gemma.modeling import LORA_TARGETS, load_model, load_processor

    work, out = Path(cfg["work"]), Path(cfg["out"])
    processor = load_processor(str(work / "tiny"))
    model = load_model(str(work / "tiny"), precision="no")
    model.config.use_cache = False
    records = load_records(cfg["train"])
    collator = Collator(processor, max_seq_length=1 << 20)
    dataset = trl_dataset(records, collator)

    class StepTimes(TrainerCallback):
        """(wall, CPU) stamps at train begin and after every optimizer step (data loading included)."""

        def __init__(self):
            self.marks: list[tuple[float, float]] = []
            self.start_rss = 0.0

        def on_train_begin(self, args, state, control, **kw):  # noqa: ARG002
            self.start_rss = _peak_rss_mb()
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
            self.marks.append((time.perf_counter(), time.process_time()))

    timer = StepTimes()
    args = SFTConfig(
        output_dir=str(out),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg["warmup_ratio"] * cfg["steps"]),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        max_length=None,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
        disable_tqdm=False,
        **TRL_OVERRIDES,
    )
    lora = LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=LORA_TARGETS["language"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora, callbacks=[timer]
    )
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    rss = _peak_rss_mb()
    step_times = [b[0] - a[0] for a, b in zip(timer.marks, timer.marks[1:])]
    cpu_times = [b[1] - a[1] for a, b in zip(timer.marks, timer.marks[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    labels = check_trl_labels(trainer, dataset, records, collator)
    trainer.save_model(str(out))
    del trainer, model
    return {
        "step_times": step_times,
        "cpu_times": cpu_times,
        "losses": losses,
        "peak_rss_mb": rss,
        "start_rss_mb": timer.start_rss,
        "wall_s": wall,
        "load": os.getloadavg()[0],
        "label_check": labels,
        "trl_samples_per_s": result.metrics.get("train_samples_per_second"),
        **score_adapter(work, out, cfg["eval_samples"]),
    }


def run_child(kind: str, cfg: dict, tag: str) -> dict:
    spec = Path(cfg["work"]) / f"child-{tag}.json"
    spec.write_text(json.dumps(cfg))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(cfg["threads"]),
        "MKL_NUM_THREADS": str(cfg["threads"]),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    result = Path(cfg["work"]) / f"result-{tag}.json"
    result.unlink(missing_ok=True)
    r = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--spec", str(spec), "--result", str(result)],
        env=env,
        cwd=REPO,
        check=False,
    )  # stderr/stdout pass through: progress bars show
    if r.returncode != 0 or not result.is_file():
        raise SystemExit(f"error: {kind} training child failed (exit {r.returncode}); see its output above")
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------- report
def summarise(res: dict, samples_per_step: int) -> dict:
    """Throughput over all steps (wall and CPU), and without step 1 (one-time warm-up)."""
    wall, cpu = res["step_times"], res["cpu_times"]
    n = len(wall)
    rest = slice(1, None) if n > 1 else slice(0, None)
    return {
        "sps": samples_per_step * n / sum(wall),
        "sps_cpu": samples_per_step * n / sum(cpu),
        "sps_steady": samples_per_step * len(wall[rest]) / sum(wall[rest]),
        "sps_cpu_steady": samples_per_step * len(cpu[rest]) / sum(cpu[rest]),
        "rss": res["peak_rss_mb"],
        "rss0": res["start_rss_mb"],
        "load": res["load"],
        "acc": res["accuracy"],
        "loss0": res["losses"][0],
        "loss1": statistics.mean(res["losses"][-5:]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps for each trainer (default: 40)")
    parser.add_argument("--batch_size", type=int, default=4, help="micro-batch size (default: 4)")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in each child (default: 1)")
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=2e-3,
        help="peak learning rate, cosine schedule; high because the tiny model is random (default: 2e-3)",
    )
    parser.add_argument(
        "--warmup_ratio", type=float, default=0.03, help="warm-up fraction of the steps (default: 0.03)"
    )
    parser.add_argument("--seed", type=int, default=42, help="training seed for both trainers (default: 42)")
    parser.add_argument(
        "--sessions", type=int, default=40, help="demo sessions generated (about 7 windows each; default: 40)"
    )
    parser.add_argument(
        "--eval_samples", type=int, default=64, help="held-out windows scored (val + test; 0 = all; default: 64)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs per trainer, interleaved ours/TRL; the table shows each run, ratios use the medians (default: 2)",
    )
    parser.add_argument(
        "--work_dir",
        default=str(Path(tempfile.gettempdir()) / "pokemon_gemma_bench_train"),
        help="tiny model + data are generated here once and reused",
    )
    parser.add_argument("--json", default="", help="also write all measurements to this JSON file")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        cfg = json.loads(Path(args.spec).read_text())
        res = (child_ours if args.child == "ours" else child_trl)(cfg)
        atomic_write_json(args.result, res)
        return 0
    for name in ("steps", "batch_size", "grad_accum", "threads", "repeats", "sessions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"preparing tiny model and {args.sessions} demo sessions under {work} ...", flush=True)
    prepare(work, args.sessions, seed=0)
    from pokemon_gemma.dataset import load_records

    n_train = len(load_records(work / "data" / "train.jsonl"))
    per_step = args.batch_size * args.grad_accum
    if n_train < per_step:
        parser.error(f"{n_train} training windows < one step ({per_step}); raise --sessions")
    base = {
        "work": str(work),
        "train": str(work / "data" / "train.jsonl"),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "threads": args.threads,
        "learning_rate": args.learning_rate,
        "warmup_ratio": args.warmup_ratio,
        "seed": args.seed,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "eval_samples": args.eval_samples,
    }
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for rep in range(args.repeats):
        for kind in ("ours", "trl"):
            print(
                f"\n=== {kind} (run {rep + 1}/{args.repeats}): {args.steps} steps x {per_step} samples, "
                f"{args.threads} thread(s) ===",
                flush=True,
            )
            out = work / f"out-{kind}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            runs[kind].append(run_child(kind, {**base, "out": str(out)}, f"{kind}-{rep}"))

    from rich.console import Console
    from rich.table import Table

    heldout = runs["ours"][0]["heldout"]
    table = Table(
        title=f"LoRA on tiny Gemma 3, {n_train} demo train windows (4 frames each): {args.steps} steps x "
        f"batch {args.batch_size} x accum {args.grad_accum}, lr {args.learning_rate:g} cosine, "
        f"seed {args.seed}, {args.threads} torch thread(s); each run a fresh process"
    )
    for col in (
        "trainer",
        "run",
        "samples/s (wall)",
        "load avg",
        "samples per CPU-s",
        "peak RSS MB (at loop start)",
        "train loss step 1 -> mean last 5",
        f"held-out acc ({heldout} windows)",
    ):
        table.add_column(col, justify="right")
    sums = {k: [summarise(r, per_step) for r in v] for k, v in runs.items()}
    for kind, label in (("ours", "ours (pokemon_gemma.train)"), ("trl", "TRL SFTTrainer")):
        for i, m in enumerate(sums[kind]):
            table.add_row(
                label,
                str(i + 1),
                f"{m['sps']:.2f}",
                f"{m['load']:.1f}",
                f"{m['sps_cpu']:.2f}",
                f"{m['rss']:.0f} ({m['rss0']:.0f})",
                f"{m['loss0']:.3f} -> {m['loss1']:.3f}",
                f"{m['acc']:.3f}",
            )
    Console(width=160).print(table)

    def ratio(key):
        return statistics.median(m[key] for m in sums["ours"]) / statistics.median(m[key] for m in sums["trl"])

    def acc(kind):
        return statistics.median(m["acc"] for m in sums[kind])

    ratios = {k: ratio(k) for k in ("sps", "sps_cpu", "sps_steady", "sps_cpu_steady", "rss")}
    busy = max(m["load"] for v in sums.values() for m in v) > (os.cpu_count() or 1) - 0.5
    print(
        f"ours/TRL samples per CPU-second: {ratios['sps_cpu']:.2f}x (without step 1: {ratios['sps_cpu_steady']:.2f}x)"
        f"   target >= 1.20x: {'met' if ratios['sps_cpu'] >= 1.2 else 'NOT met'}"
    )
    print(
        f"ours/TRL samples/s (wall):       {ratios['sps']:.2f}x (without step 1: {ratios['sps_steady']:.2f}x)"
        + (
            "   unreliable: other processes kept the load average near or above the core count"
            if busy
            else f"   target >= 1.20x: {'met' if ratios['sps'] >= 1.2 else 'NOT met'}"
        )
    )
    print(
        f"ours/TRL peak RSS:               {ratios['rss']:.2f}x   target <= 1.00x: "
        f"{'met' if ratios['rss'] <= 1.0 else 'NOT met'}"
    )
    print(
        f"held-out accuracy (our ButtonScorer, same {heldout} windows): ours {acc('ours'):.3f}, TRL {acc('trl'):.3f} "
        f"(difference {acc('ours') - acc('trl'):+.3f}); majority-button baseline "
        f"{majority_share(work, args.eval_samples):.3f}"
    )
    lc = runs["trl"][0]["label_check"]
    print(
        f"TRL settings changed from its defaults to match ours: {TRL_OVERRIDES}; max_length=None, "
        f"completion_only_loss=True"
    )
    print(
        f"TRL label check (2 samples): token_type_ids present={lc['token_type_ids']}, labelled tokens="
        f"{lc['labelled_tokens']}, labels == answer + '<end_of_turn>\\n': {lc['labels_ok']}"
    )
    for kind in ("ours", "trl"):
        m = sums[kind][0]
        if not m["loss1"] < m["loss0"]:
            print(f"warning: {kind}'s train loss did not decrease ({m['loss0']:.3f} -> {m['loss1']:.3f})")
    if args.json:
        atomic_write_json(args.json, {"config": base, "runs": runs, "summary": sums, "ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
