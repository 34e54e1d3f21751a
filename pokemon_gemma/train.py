"""The hand-written accelerate loop for multi-image Gemma 3 (LoRA / QLoRA / full fine-tuning).

Read top to bottom: set-up, then one explicit loop (prefetch the step's micro-batches, count their
labelled tokens over all processes, backward each with loss = CE_sum * world / N_step, step),
eval, save. Normalising by the step's token count makes batch 4 x accum 1, batch 1 x accum 4 and
2 processes x batch 2 produce the same gradients.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .collate import Collator, SampleError
from .config import Settings, add_settings_args, load_settings_or_exit, settings_from_args, setup_logging
from .dataset import Record, RecordError, load_records
from .errors import first_line
from .fileio import JsonlError, atomic_write_json, file_sha256, staged_dir
from .loss import loss_sum
from .modeling import DTYPES, ModelLoadError, apply_lora, load_model, load_processor
from .progress import progress
from .scoring import ButtonScorer

log = logging.getLogger("pokemon_gemma.train")

TRAIN_FLAGS = [
    "model_name",
    "dataset_path",
    "eval_dataset_path",
    "output_dir",
    "max_steps",
    "num_epochs",
    "batch_size",
    "grad_accum",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "lr_scheduler",
    "max_seq_length",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "init_adapter",
    "use_peft",
    "use_qlora",
    "gradient_checkpointing",
    "mixed_precision",
    "frame_layout",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "seed",
    "max_grad_norm",
    "eval_max_samples",
    "eval_batch_size",
    "dataloader_workers",
    "report_to",
    "run_name",
]


def build_arg_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    settings = settings or Settings()
    parser = argparse.ArgumentParser(
        description="Fine-tune Gemma 3 on 4-frame Pokemon windows with a hand-written accelerate loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_settings_args(parser, settings, TRAIN_FLAGS)
    parser.add_argument(
        "--no_peft", dest="use_peft", action="store_false", help="alias of --no-use_peft (full fine-tuning)"
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (newest checkpoint in --output_dir) or a checkpoint folder",
    )
    return parser


class TrainingError(RuntimeError):
    """Stops training with a one-line message (missing data, unusable samples, bad resume)."""


@dataclass
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    global_micro_batch: int  # samples per micro-batch over all processes


def plan_steps(n_samples: int, s: Settings, world: int) -> StepPlan:
    global_micro = s.batch_size * world
    per_step = global_micro * s.grad_accum
    steps_per_epoch = n_samples // per_step
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{n_samples} training samples are fewer than one optimizer step "
            f"(batch {s.batch_size} x accum {s.grad_accum} x {world} processes = {per_step})"
        )
    total = s.max_steps if s.max_steps > 0 else max(1, math.ceil(steps_per_epoch * s.num_epochs))
    return StepPlan(steps_per_epoch, total, global_micro)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch depends only on (seed, epoch): resuming needs no saved sampler."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def step_indices(plan: StepPlan, s: Settings, step: int, n: int, rank: int) -> list[list[int]]:
    """This process's micro-batches (sample indices) for optimizer step `step` (0-based)."""
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    order = epoch_order(n, s.seed, epoch)
    out = []
    for k in range(s.grad_accum):
        start = (in_epoch * s.grad_accum + k) * plan.global_micro_batch + rank * s.batch_size
        out.append(order[start : start + s.batch_size])
    return out


class StepMicroBatches(torch.utils.data.Dataset):
    """Item j = collated micro-batch j of this process from `start_step` on, in training order, so a
    DataLoader with workers prepares the next micro-batches while the model trains."""

    def __init__(
        self, records: list[Record], collator: Collator, plan: StepPlan, s: Settings, rank: int, start_step: int
    ):
        self.records, self.collator, self.plan, self.s, self.rank = records, collator, plan, s, rank
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start_step) * self.s.grad_accum

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        step, k = divmod(j, self.s.grad_accum)
        idx = step_indices(self.plan, self.s, self.start_step + step, len(self.records), self.rank)[k]
        return self.collator([self.records[i] for i in idx])


def make_scheduler(optimizer, s: Settings, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if s.lr_scheduler == "constant" else s.lr_scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=int(s.warmup_ratio * total_steps), num_training_steps=total_steps
    )


def build_model(s: Settings):
    """Model (+ LoRA) and processor exactly as a hub id would load."""
    processor = load_processor(s.model_name, token=s.hub_token)
    precision = "bf16" if s.mixed_precision == "bf16" else "no"
    model = load_model(s.model_name, precision=precision, qlora=s.use_qlora, token=s.hub_token)
    if s.use_peft or s.use_qlora:
        model = apply_lora(
            model,
            r=s.lora_r,
            alpha=s.lora_alpha,
            dropout=s.lora_dropout,
            targets=s.lora_targets,
            qlora=s.use_qlora,
            gradient_checkpointing=s.gradient_checkpointing,
            init_adapter=s.init_adapter or None,
        )
    elif s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, processor


def filter_trainable_samples(records: list[Record], collator: Collator, name: str) -> list[Record]:
    """Shorten over-long contexts; reject (by id, counted) samples that cannot fit without truncation."""
    kept, shortened = [], 0
    for r in records:
        try:
            _, was_shortened = collator.fit_context(
                r.context, r.question, r.output.strip() + "<end_of_turn>\n", r.sample_id
            )
        except SampleError as exc:
            log.warning("rejected %s sample: %s", name, exc)
            continue
        shortened += was_shortened
        kept.append(r)
    if len(kept) < len(records) or shortened:
        log.warning(
            "%s: %d samples kept, %d rejected as too long, %d with shortened context",
            name,
            len(kept),
            len(records) - len(kept),
            shortened,
        )
    if not kept:
        raise TrainingError(f"{name}: no sample fits --max_seq_length {collator.max_seq_length}")
    return kept


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl plus optional W&B / TensorBoard; a tracker failure never stops training."""

    def __init__(self, s: Settings, output_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.wandb = self.tb = None
        if not enabled:
            return
        if self.path.exists():  # keep only what happened up to the resumed step
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            with self.path.open("w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step)
        if s.report_to == "wandb":
            try:
                import wandb

                self.wandb = wandb.init(
                    project=s.wandb_project,
                    entity=s.wandb_entity or None,
                    name=s.run_name or output_dir.name,
                    config=s.masked(),
                    mode=s.wandb_mode or None,
                    resume="allow",
                )
            except Exception as exc:  # noqa: BLE001 - W&B unreachable must not stop training
                log.warning("W&B disabled: %s", first_line(exc))
        elif s.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "logs"))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        metrics = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=row["step"])
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B log failed: %s", type(exc).__name__)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def evaluate(model, collator: Collator, records: list[Record], batch_size: int) -> dict[str, float]:
    """Validation loss (token-normalised) and button accuracy from full-answer scoring, both over
    `batch_size` samples per forward pass."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(records), batch_size):
        batch = collator(records[i : i + batch_size])
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        value, n = loss_sum(model, batch)
        total, tokens = total + float(value), tokens + n
    scorer = ButtonScorer(model, collator)
    correct = 0
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        correct += sum(s.button == r.button for s, r in zip(scorer.score_records(batch), batch))
    model.train(was_training)
    return {"eval/loss": total / max(tokens, 1), "eval/accuracy": correct / len(records)}


class StopFlag:
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit 0."""

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True


def train(s: Settings, resume_from: str | None = None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=s.mixed_precision, cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    output_dir = Path(s.output_dir)
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        output_dir = output_dir / os.environ["WANDB_RUN_ID"]  # sweep runs share one command line
    set_seed(s.seed)

    # --- data
    try:
        train_records = load_records(s.dataset_path)
        eval_records = load_records(s.eval_dataset_path) if s.eval_dataset_path else []
    except (RecordError, JsonlError) as exc:
        raise TrainingError(str(exc)) from None
    if s.eval_max_samples > 0:
        eval_records = eval_records[: s.eval_max_samples]

    # --- model
    model, processor = build_model(s)
    dtype = DTYPES["bf16"] if s.mixed_precision == "bf16" else torch.float32
    collator = Collator(processor, s.max_seq_length, s.frame_layout, pixel_dtype=dtype)
    train_records = filter_trainable_samples(train_records, collator, "train")
    if eval_records:
        eval_records = filter_trainable_samples(eval_records, collator, "eval")
    plan = plan_steps(len(train_records), s, world)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = make_scheduler(optimizer, s, plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # --- resume
    state = {"step": 0, "best_accuracy": None, "best_step": None}
    if resume_from:
        path = ckpt.latest_checkpoint(output_dir) if resume_from == "latest" else Path(resume_from)
        if path is None or not (path / ckpt.STATE_FILE).is_file():
            if resume_from != "latest":
                raise TrainingError(f"{resume_from}: not a finished checkpoint (no {ckpt.STATE_FILE})")
            log.info("no checkpoint in %s: starting from scratch", output_dir)
        else:
            state = ckpt.load_checkpoint(path, accelerator.unwrap_model(model), optimizer, scheduler, rank)
            log.info("resumed from %s at step %d", path, state["step"])

    run_config = {
        **s.masked(),
        "dataset_sha256": file_sha256(s.dataset_path),
        "world_size": world,
        "train_samples": len(train_records),
        "total_steps": plan.total_steps,
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "run_config.json", run_config)
    metrics = MetricsLog(s, output_dir, state["step"], accelerator.is_main_process)
    stop = StopFlag()
    stop.install()

    bar = progress(
        total=plan.total_steps,
        initial=state["step"],
        desc="train",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    device = accelerator.device
    model.train()
    window = new_window()

    def save(step: int) -> None:
        rngs = [ckpt.rng_state()]
        if world > 1:  # every process keeps its own RNG stream
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if accelerator.is_main_process:
            ckpt.save_checkpoint(
                output_dir,
                step,
                accelerator.unwrap_model(model),
                optimizer,
                scheduler,
                {**state, "step": step, "epoch": step / plan.steps_per_epoch},
                run_config,
                rngs,
                s.save_total_limit,
            )
        accelerator.wait_for_everyone()

    loader = iter(
        torch.utils.data.DataLoader(
            StepMicroBatches(train_records, collator, plan, s, rank, state["step"]),
            batch_size=None,
            shuffle=False,
            num_workers=s.dataloader_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(
                s.seed
            ),  # its seed draw must not move the global RNG (exact resume)
            prefetch_factor=2 * s.grad_accum if s.dataloader_workers > 0 else None,
        )
    )
    while state["step"] < plan.total_steps:
        step = state["step"]
        micro = [next(loader) for _ in range(s.grad_accum)]
        step_loss, n_step = backward_step(accelerator, model, micro)
        if s.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1

        total_loss = (
            float(accelerator.reduce(torch.tensor(step_loss, device=device), "sum")) if world > 1 else step_loss
        )
        window["loss"] += total_loss / n_step
        window["steps"] += 1
        window["tokens"] += sum(int(b["attention_mask"].sum()) for b in micro) * world
        window["samples"] += plan.global_micro_batch * s.grad_accum
        elapsed = time.perf_counter() - window["start"]
        bar.update(1)
        bar.set_postfix(
            loss=f"{total_loss / n_step:.4f}",
            lr=f"{scheduler.get_last_lr()[0]:.2e}",
            samples_s=f"{window['samples'] / elapsed:.1f}",
            tokens_s=f"{window['tokens'] / elapsed:.0f}",
        )

        row = {}
        if step % max(s.logging_steps, 1) == 0 or step == plan.total_steps:
            row = {
                "step": step,
                "train/loss": window["loss"] / window["steps"],
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": window["samples"] / elapsed,
                "tokens_per_s": window["tokens"] / elapsed,
                "epoch": step / plan.steps_per_epoch,
                **peak_memory(),
            }
            window = new_window()
        if eval_records and ((s.eval_steps > 0 and step % s.eval_steps == 0) or step == plan.total_steps):
            eval_start = time.perf_counter()
            if accelerator.is_main_process:
                results = evaluate(accelerator.unwrap_model(model), collator, eval_records, s.eval_batch_size)
                row = {"step": step, **row, **results}
                bar.write(f"step {step}: eval loss {results['eval/loss']:.4f}, accuracy {results['eval/accuracy']:.3f}")
                if state["best_accuracy"] is None or results["eval/accuracy"] > state["best_accuracy"]:
                    state["best_accuracy"], state["best_step"] = results["eval/accuracy"], step
                    save_final(
                        accelerator.unwrap_model(model),
                        processor,
                        output_dir / "best",
                        run_config,
                        {"step": step, **results},
                    )
            accelerator.wait_for_everyone()
            state["best_accuracy"], state["best_step"] = _broadcast_best(accelerator, state)
            window["start"] += time.perf_counter() - eval_start  # throughput excludes eval time
        if row:
            metrics.log(row)
        if (s.save_steps > 0 and step % s.save_steps == 0) or stop.requested:
            save(step)
        if stop.requested:
            log.warning("stop requested: checkpoint saved at step %d, exiting", step)
            break

    bar.close()
    metrics.close()
    if accelerator.is_main_process and not stop.requested:
        save_final(
            accelerator.unwrap_model(model),
            processor,
            output_dir,
            run_config,
            {"step": state["step"], "best_accuracy": state["best_accuracy"], "best_step": state["best_step"]},
        )
        log.info("saved %s (final) and %s (best at step %s)", output_dir, output_dir / "best", state["best_step"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def _broadcast_best(accelerator, state) -> tuple:
    if accelerator.num_processes == 1:
        return state["best_accuracy"], state["best_step"]
    from accelerate.utils import broadcast_object_list

    return tuple(broadcast_object_list([state["best_accuracy"], state["best_step"]]))


def backward_step(accelerator, model, micro: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns (this process's CE sum, step tokens).

    Each micro-batch's loss is CE_sum * world / N_step, where N_step counts the labelled tokens of
    the whole step on every process: DDP's gradient average then yields sum(CE) / N_step exactly."""
    world, device = accelerator.num_processes, accelerator.device
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    n_step = int(accelerator.reduce(torch.tensor(n_local, device=device), "sum")) if world > 1 else n_local
    step_loss = 0.0
    for k, batch in enumerate(micro):
        batch = {key: v.to(device) for key, v in batch.items()}
        last = k == len(micro) - 1
        with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            value, _ = loss_sum(model, batch)
            accelerator.backward(value * world / n_step)
        step_loss += float(value.detach())
    return step_loss, n_step


def new_window() -> dict:
    return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "start": time.perf_counter()}


def save_final(model, processor, path: Path, run_config: dict, info: dict) -> None:
    """Adapter (or model) + processor, moved in beside any existing files (OUTPUT_DIR also holds
    checkpoints and metrics) only once all of them are written."""
    with staged_dir(path, tag="final", merge=True) as tmp:
        ckpt.save_weights(model, tmp, processor)
        atomic_write_json(tmp / "run_config.json", run_config)
        atomic_write_json(tmp / "training_info.json", info)


def peak_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    settings = load_settings_or_exit()
    args = build_arg_parser(settings).parse_args(argv)
    s = settings_from_args(settings, args)
    setup_logging(s)
    try:
        train(s, args.resume_from_checkpoint)
    except (TrainingError, ModelLoadError, SampleError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
