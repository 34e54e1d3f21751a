#!/usr/bin/env python
"""GPU checks for training beyond one device (one H100/H200; random-weight gemma-3-4b with the real
config, no download). Run through bench/gpu_checks.sh, which builds the model and the data first.

Measured, each run a fresh process, batch 1, 4 frames at 896x896 (1024 image tokens per sample):
  1. our loop, LoRA, launched with train_gemma3.sh + accelerate_configs/single_gpu.yaml and no
     MIXED_PRECISION anywhere: the precision it resolved must be bf16 "from accelerate config";
  2. TRL's SFTTrainer, LoRA bf16, same model, data, LoRA config, batch, steps;
  3. our loop, QLoRA (nf4, bf16 compute); 4. TRL, QLoRA;
  5. our loop under accelerate_configs/fsdp.yaml on one GPU (FSDP2, world 1): a checkpoint halfway,
     then a resume from it to the end.
Per run: peak GPU memory (torch.cuda.max_memory_allocated), samples/s and tokens/s (median over the
steps after the first; tokens = every input token, image tokens included, counted with our collator
for both trainers). Results: OUT/gpu_checks.json and a table.

    python bench/gpu_checks.py --model_dir M --dataset_path D --output_dir OUT [--steps 12]
    python bench/gpu_checks.py --check ...   # CPU: build every command and parse its flags, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_targets": "language"}


def ours_flags(model_dir: str, dataset: str, out: Path, steps: int, qlora: bool, save_steps: int = 0) -> list[str]:
    flags = [
        "--model_name", model_dir, "--dataset_path", dataset, "--eval_dataset_path", "", "--output_dir", str(out),
        "--max_steps", str(steps), "--batch_size", "1", "--grad_accum", "1", "--learning_rate", "1e-4",
        "--logging_steps", "1", "--eval_steps", "0", "--save_steps", str(save_steps), "--max_seq_length", "2048",
        "--lora_r", str(LORA["lora_r"]), "--lora_alpha", str(LORA["lora_alpha"]),
        "--lora_dropout", str(LORA["lora_dropout"]), "--lora_targets", LORA["lora_targets"], "--report_to", "none",
    ]  # fmt: skip
    return flags + (["--use_qlora"] if qlora else [])


def ours_env(config: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MIXED_PRECISION"}  # let the accelerate config speak
    env.update(ACCELERATE_CONFIG=config, PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    return env


def run_ours(tag: str, flags: list[str], config: str, out_dir: Path) -> dict:
    out = Path(flags[flags.index("--output_dir") + 1])
    log = out_dir / f"{tag}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(["./train_gemma3.sh", *flags], cwd=REPO, env=ours_env(config), stdout=fh, stderr=fh)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"tag": tag, "error": f"exit {proc.returncode}, see {log}", "wall_s": wall}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = rows[1:] or rows
    launch = json.loads((out / "run_config.json").read_text())["launch"]
    return {
        "tag": tag,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in later),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
        "peak_memory_gb": max(r.get("peak_memory_gb", 0.0) for r in rows),
        "final_loss": rows[-1]["train/loss"],
        "launch": launch,
        "wall_s": wall,
        "log": str(log),
    }


def child_trl(cfg: dict) -> dict:
    """TRL SFTTrainer on the same model/data/LoRA/batch/steps, bf16 (QLoRA: the same nf4 model load)."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pokemon_gemma.collate import Collator
    from pokemon_gemma.dataset import load_records
    from pokemon_gemma.modeling import LORA_TARGETS, load_model, load_processor

    processor = load_processor(cfg["model_dir"])
    model = load_model(cfg["model_dir"], precision="bf16", qlora=cfg["qlora"]).to("cuda")
    model.config.use_cache = False
    records = load_records(cfg["dataset"])
    collator = Collator(processor, max_seq_length=1 << 20)
    from datasets import Dataset, Image, List

    rows = {
        "prompt": [[{"role": "user", "content": collator.user_text(r.context, r.question)}] for r in records],
        "completion": [[{"role": "assistant", "content": r.output.strip()}] for r in records],
        "images": [list(r.frames) for r in records],
    }
    dataset = Dataset.from_dict(rows).cast_column("images", List(Image()))

    class Marks(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    marks = Marks()
    args = SFTConfig(
        output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, seed=42,
        max_length=None, completion_only_loss=True, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_num_workers=1, bf16=True, gradient_checkpointing=False, optim="adamw_torch",
    )  # fmt: skip
    lora = LoraConfig(
        r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules=LORA_TARGETS[LORA["lora_targets"]], bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora, callbacks=[marks]
    )
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start, *marks.times], marks.times)][1:]
    step_s = statistics.median(steps)
    used = records[: cfg["steps"]]
    tokens = statistics.mean(collator.sample_length(r) for r in used)  # every token, images included
    return {
        "tag": cfg["tag"],
        "samples_per_s": 1 / step_s,
        "tokens_per_s": tokens / step_s,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
        "wall_s": time.perf_counter() - start,
    }


def run_trl(tag: str, cfg: dict, out_dir: Path) -> dict:
    spec, result, log = out_dir / f"{tag}.spec.json", out_dir / f"{tag}.json", out_dir / f"{tag}.log"
    spec.write_text(json.dumps({**cfg, "tag": tag}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(spec), "--result", str(result)],
            cwd=REPO, env=env, stdout=fh, stderr=fh,
        )  # fmt: skip
    if proc.returncode != 0 or not result.is_file():
        return {"tag": tag, "error": f"exit {proc.returncode}, see {log}"}
    return json.loads(result.read_text())


def plan(args) -> list[tuple[str, str, list[str] | dict, str]]:
    """(tag, kind, flags or TRL spec, accelerate config) for every run, in order."""
    work = Path(args.output_dir) / "runs"
    runs = []
    for mode, qlora in (("lora_bf16", False), ("qlora", True)):
        flags = ours_flags(args.model_dir, args.dataset_path, work / f"ours_{mode}", args.steps, qlora)
        runs.append((f"ours_{mode}", "ours", flags, "accelerate_configs/single_gpu.yaml"))
        spec = {"model_dir": args.model_dir, "dataset": args.dataset_path, "out": str(work / f"trl_{mode}"),
                "steps": args.steps, "qlora": qlora}  # fmt: skip
        runs.append((f"trl_{mode}", "trl", spec, ""))
    half = max(1, args.steps // 2)
    fsdp = ours_flags(args.model_dir, args.dataset_path, work / "ours_fsdp_1gpu", args.steps, False, save_steps=half)
    fsdp_first = [*fsdp[: fsdp.index("--max_steps") + 1], str(half), *fsdp[fsdp.index("--max_steps") + 2 :]]
    runs.append(("ours_fsdp_1gpu_first_half", "ours", fsdp_first, "accelerate_configs/fsdp.yaml"))
    runs.append(
        (
            "ours_fsdp_1gpu_resumed",
            "ours",
            [*fsdp, "--resume_from_checkpoint", "latest"],
            "accelerate_configs/fsdp.yaml",
        )
    )
    return runs


def check(runs) -> int:
    """CPU: every training command parses with the real training parser; every config loads with
    accelerate's loader and is accepted for a 1-GPU machine."""
    from pokemon_gemma import distributed as dist
    from pokemon_gemma.config import Settings
    from pokemon_gemma.train import build_arg_parser

    parser = build_arg_parser(Settings())
    one_gpu = dist.Machine(cuda_devices=1, mps=False, deepspeed=False)
    for tag, kind, flags, config in runs:
        if kind == "ours":
            parser.parse_args(flags)
            dist.launch_plan(REPO / config, one_gpu)
        print(f"ok: {tag} ({kind}{', ' + config if config else ''})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_dir", default="/tmp/gpu_checks/model", help="bench/make_random_model.py --size 4b output"
    )
    parser.add_argument("--dataset_path", default="/tmp/gpu_checks/data/train.jsonl", help="training JSONL (4 frames)")
    parser.add_argument("--output_dir", default="/tmp/gpu_checks_out", help="results, logs and run folders")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: 12)")
    parser.add_argument("--check", action="store_true", help="parse every command's flags and configs; run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child_trl(json.loads(Path(args.child).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0
    runs = plan(args)
    if args.check:
        return check(runs)
    out_dir = Path(args.output_dir)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for tag, kind, spec, config in runs:
        print(f"=== {tag}", flush=True)
        res = run_ours(tag, spec, config, out_dir) if kind == "ours" else run_trl(tag, spec, out_dir)
        results.append(res)
        print(json.dumps(res), flush=True)
    by = {r["tag"]: r for r in results}
    lora = by.get("ours_lora_bf16", {}).get("launch", {})
    checks = {
        "single_gpu.yaml resolved precision": f"{lora.get('precision')} (from {lora.get('precision_source')})",
        "single_gpu.yaml precision is bf16 from the accelerate config": (
            lora.get("precision"),
            lora.get("precision_source"),
        )
        == ("bf16", "accelerate config"),  # fmt: skip
        "fsdp.yaml on 1 GPU": by.get("ours_fsdp_1gpu_resumed", {}).get("launch", {}).get("distributed_type"),
    }
    for mode in ("lora_bf16", "qlora"):
        ours, trl = by.get(f"ours_{mode}", {}), by.get(f"trl_{mode}", {})
        if "samples_per_s" in ours and "samples_per_s" in trl:
            checks[f"{mode}: ours/TRL samples/s"] = ours["samples_per_s"] / trl["samples_per_s"]
            checks[f"{mode}: ours/TRL peak memory"] = ours["peak_memory_gb"] / trl["peak_memory_gb"]
    (out_dir / "gpu_checks.json").write_text(json.dumps({"runs": results, "checks": checks}, indent=2))
    print(f"{'run':28} {'samples/s':>10} {'tokens/s':>10} {'peak GB':>8} {'loss':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['tag']:28} ERROR {r['error']}")
        else:
            print(f"{r['tag']:28} {r['samples_per_s']:10.3f} {r['tokens_per_s']:10.0f} {r['peak_memory_gb']:8.2f} "
                  f"{r['final_loss']:8.3f}")  # fmt: skip
    for k, v in checks.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
