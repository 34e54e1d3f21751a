"""The hand-written accelerate loop for multi-image Gemma 3 (LoRA / QLoRA / full fine-tuning).

Read top to bottom: set-up, then one explicit loop (prefetch the step's micro-batches, count their
labelled tokens over all processes, backward each with loss = CE_sum * world / N_step, step),
eval, save. Normalising by the step's token count makes batch 4 x accum 1, batch 1 x accum 4 and
2 processes x batch 2 produce the same gradients. One process, DDP, FSDP2 and DeepSpeed ZeRO-3 run
the same loop; where they differ is `distributed.Strategy` (sharded models: every rank evaluates and
joins the gathers of the adapter and optimizer state; rank 0 writes the files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as dist
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
    "image_tokens",
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


def build_model(s: Settings, shard_4bit: bool = False):
    """Model (+ LoRA) and processor exactly as a hub id would load. `shard_4bit` (FSDP): store the
    4-bit weights in bf16 so that FSDP shards them too (it shards floating tensors only)."""
    processor = load_processor(s.model_name, token=s.hub_token, image_tokens=s.image_tokens)
    precision = "bf16" if s.mixed_precision == "bf16" else "no"
    model = load_model(
        s.model_name, precision=precision, qlora=s.use_qlora, token=s.hub_token, quant_storage_bf16=shard_4bit
    )
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
                r.context, r.question, collator.answer_text(r.output), r.sample_id, collator.record_sizes(r)
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

    def __init__(self, s: Settings, output_dir: Path, resume_step: int, enabled: bool, run_id: str | None = None):
        self.enabled = enabled
        self.run_id = run_id  # the W&B run to continue (stored in every checkpoint's trainer_state.json)
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

                # The key may live only in .env (Settings, not os.environ): it goes into this run's settings,
                # never into os.environ (child processes) or wandb.login (which appends it to ~/.netrc).
                settings = wandb.Settings(api_key=s.wandb_api_key) if s.wandb_api_key else None
                self.wandb = wandb.init(
                    project=s.wandb_project,
                    entity=s.wandb_entity or None,
                    name=s.run_name or output_dir.name,
                    config=s.masked(),
                    mode=s.wandb_mode or None,
                    id=run_id,
                    resume="allow",  # offline the id is continued at `wandb sync`
                    settings=settings,
                )
                self.run_id = self.wandb.id
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

    def agreed(self, accelerator) -> bool:
        """Stop when any process was asked to (the checkpoint save is collective: all stop together)."""
        if accelerator.num_processes > 1:
            flag = torch.tensor(int(self.requested), device=accelerator.device)
            self.requested = bool(accelerator.reduce(flag, "sum"))
        return self.requested

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True


def train(s: Settings, resume_from: str | None = None) -> Path:
    from accelerate.utils import set_seed

    # --- launch: checked against this machine, one precision, what it got logged and recorded
    accelerator, strategy, launch = dist.setup(s.mixed_precision, qlora=s.use_qlora, peft=s.use_peft)
    s = dataclasses.replace(s, mixed_precision=launch.precision)
    precision = launch.precision
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    output_dir = Path(s.output_dir)
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        output_dir = output_dir / os.environ["WANDB_RUN_ID"]  # sweep runs share one command line
    set_seed(s.seed)

    # --- the checkpoint to resume from, read and verified before the model is built
    resume = None
    if resume_from:
        resume, skipped = ckpt.find_resume_checkpoint(resume_from, output_dir, rank, strategy.kind)
        for line in skipped if is_main else []:
            log.warning("%s", line)
        if resume is None and is_main:
            log.info("no checkpoint in %s: starting from scratch", output_dir)

    # --- data
    try:
        train_records = load_records(s.dataset_path)
        eval_records = load_records(s.eval_dataset_path) if s.eval_dataset_path else []
    except (RecordError, JsonlError) as exc:
        raise TrainingError(str(exc)) from None
    if s.eval_max_samples > 0:
        eval_records = eval_records[: s.eval_max_samples]

    # --- model
    model, processor = build_model(s, shard_4bit=strategy.kind == "fsdp")
    dtype = DTYPES["bf16"] if precision == "bf16" else torch.float32
    collator = Collator(processor, s.max_seq_length, s.frame_layout, pixel_dtype=dtype)
    train_records = filter_trainable_samples(train_records, collator, "train")
    if eval_records:
        eval_records = filter_trainable_samples(eval_records, collator, "eval")
    plan = plan_steps(len(train_records), s, world)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = make_scheduler(optimizer, s, plan.total_steps)
    model, optimizer, trainable = strategy.prepare(
        model, optimizer, batch_size=s.batch_size, grad_accum=s.grad_accum, max_grad_norm=s.max_grad_norm
    )
    if is_main and strategy.sharded:
        log.info("%s", strategy.describe(model))

    # --- resume
    state = {"step": 0, "best_accuracy": None, "best_step": None}
    if resume is not None:
        state = ckpt.restore(resume, model if strategy.sharded else accelerator.unwrap_model(model), optimizer,
                             scheduler, strategy)  # fmt: skip
        log.info("resumed from %s at step %d", resume.path, state["step"])
    state["distributed"] = strategy.kind  # a checkpoint is resumed by the same kind of launch

    run_config = {
        **s.masked(),
        "dataset_sha256": file_sha256(s.dataset_path),
        "world_size": world,
        "launch": launch.to_json(),
        "train_samples": len(train_records),
        "total_steps": plan.total_steps,
    }
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "run_config.json", run_config)
    metrics = MetricsLog(s, output_dir, state["step"], is_main, run_id=state.get("wandb_run_id"))
    if metrics.run_id:
        state["wandb_run_id"] = metrics.run_id  # saved with every checkpoint: a resumed run continues it
    stop = StopFlag()
    stop.install()

    bar = progress(total=plan.total_steps, initial=state["step"], desc="train", unit="step", disable=not is_main)
    device = accelerator.device
    model.train()
    window = new_window()

    def write_model(path: Path, info: dict) -> None:
        """The adapter (gathered from every rank when sharded) + processor, written by rank 0."""
        weights = strategy.trainable_state(model)
        on_main_then_agree(
            accelerator,
            lambda: save_final(accelerator.unwrap_model(model), processor, path, run_config, info, weights),
        )

    def save(step: int) -> None:
        rngs = [ckpt.rng_state()]
        if world > 1:  # every process keeps its own RNG stream
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        weights = strategy.trainable_state(model)
        optimizer_state = strategy.optimizer_state(model, optimizer)
        engine_dir = engine_staging_dir(accelerator, output_dir, step) if strategy.kind == "deepspeed" else None
        if engine_dir is not None:
            strategy.save_engine(model, engine_dir)
            accelerator.wait_for_everyone()
        on_main_then_agree(
            accelerator,
            lambda: ckpt.save_checkpoint(
                output_dir,
                step,
                accelerator.unwrap_model(model),
                optimizer_state,
                scheduler,
                {**state, "step": step, "epoch": step / plan.steps_per_epoch},
                run_config,
                rngs,
                s.save_total_limit,
                trainable_state=weights,
                engine_dir=engine_dir,
            ),
        )

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
        step_loss, n_step = backward_step(accelerator, model, micro, strategy)
        strategy.clip(trainable, s.max_grad_norm)
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
            results = None
            if is_main or strategy.sharded:  # a sharded model: every rank runs the same forwards
                with strategy.evaluating(model):
                    results = evaluate(strategy.eval_model(model), collator, eval_records, s.eval_batch_size)
            results = from_main(accelerator, results)
            row = {"step": step, **row, **results}
            bar.write(f"step {step}: eval loss {results['eval/loss']:.4f}, accuracy {results['eval/accuracy']:.3f}")
            if state["best_accuracy"] is None or results["eval/accuracy"] > state["best_accuracy"]:
                state["best_accuracy"], state["best_step"] = results["eval/accuracy"], step
                write_model(output_dir / "best", {"step": step, **results})
            window["start"] += time.perf_counter() - eval_start  # throughput excludes eval time
        if row:
            metrics.log(row)
        stopping = stop.agreed(accelerator)
        if (s.save_steps > 0 and step % s.save_steps == 0) or stopping:
            save(step)
        if stopping:
            log.warning("stop requested: checkpoint saved at step %d, exiting", step)
            break

    bar.close()
    metrics.close()
    if strategy.kind == "deepspeed" and is_main:
        log.info("DeepSpeed engine steps %d, loop steps %d", model.global_steps, state["step"])
    if not stop.requested:
        write_model(
            output_dir,
            {"step": state["step"], "best_accuracy": state["best_accuracy"], "best_step": state["best_step"]},
        )
        if is_main:
            log.info("saved %s (final) and %s (best at step %s)", output_dir, output_dir / "best", state["best_step"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def from_main(accelerator, value):
    """The main process's value on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def on_main_then_agree(accelerator, write) -> None:
    """Run `write` (files) on the main process; if it fails, every process raises the same one-line
    CheckpointError, so no rank is left waiting at a barrier for a rank that gave up."""
    error = None
    if accelerator.is_main_process:
        try:
            write()
        except ckpt.CheckpointError as exc:
            error = str(exc)
    error = from_main(accelerator, error)
    if error:
        raise ckpt.CheckpointError(error)


def engine_staging_dir(accelerator, output_dir: Path, step: int) -> Path:
    """Where every rank writes DeepSpeed's partitioned files before rank 0 moves them into checkpoint-N/;
    named like a staging folder of rank 0's process, so a killed run's leftovers are cleaned up."""
    import shutil

    pid = from_main(accelerator, os.getpid())
    folder = output_dir / f".checkpoint-{step}.deepspeed-{pid}"
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def backward_step(accelerator, model, micro: list[dict[str, torch.Tensor]], strategy=None) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns (this process's CE sum, step tokens).

    Each micro-batch's loss is CE_sum * world / N_step, where N_step counts the labelled tokens of
    the whole step on every process: DDP's (and FSDP's, DeepSpeed's) gradient average then yields
    sum(CE) / N_step exactly."""
    strategy = strategy or dist.Strategy(accelerator)
    world, device = accelerator.num_processes, accelerator.device
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    n_step = int(accelerator.reduce(torch.tensor(n_local, device=device), "sum")) if world > 1 else n_local
    step_loss = 0.0
    for k, batch in enumerate(micro):
        batch = {key: v.to(device) for key, v in batch.items()}
        with strategy.micro_batch(model, last=k == len(micro) - 1), accelerator.autocast():
            value, _ = loss_sum(model, batch)
            strategy.backward(value * world / n_step)
        step_loss += float(value.detach())
    return step_loss, n_step


def new_window() -> dict:
    return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "start": time.perf_counter()}


def save_final(model, processor, path: Path, run_config: dict, info: dict, state_dict: dict | None = None) -> None:
    """Adapter (or model) + processor, moved in beside any existing files (OUTPUT_DIR also holds
    checkpoints and metrics) only once all of them are written. `state_dict`: gathered from shards."""
    try:
        with staged_dir(path, tag="final", merge=True) as tmp:
            ckpt.save_weights(model, tmp, processor, state_dict=state_dict)
            atomic_write_json(tmp / "run_config.json", run_config)
            atomic_write_json(tmp / "training_info.json", info)
    except (OSError, RuntimeError) as exc:
        raise ckpt.CheckpointError(ckpt.explain_write_error(exc, path)) from None


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
    except dist.LaunchError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank refuses for the same reason: say it once
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TrainingError, ModelLoadError, SampleError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
