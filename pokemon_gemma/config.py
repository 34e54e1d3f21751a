"""One typed settings object for every stage: defaults < `.env` < environment < CLI flags.

Scripts build their argparse flags from these fields (`add_settings_args`), so a flag's default
is whatever `.env`/the environment says, and `--help` shows it. Secrets are never printed: use
`masked()` before saving or logging a config, and `install_secret_filter()` for log lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

SECRET_NAMES = ("HUGGINGFACE_TOKEN", "HF_TOKEN", "WANDB_API_KEY", "SERVER_API_KEY")
MASK = "***"


class SettingsError(ValueError):
    """A setting has a value of the wrong type; the message names the variable."""


def _f(default: Any, help: str, choices: tuple | None = None, secret: bool = False):
    return field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


@dataclass
class Settings:
    # --- model and data
    model_name: str = _f(
        "google/gemma-3-4b-it", "model id or local folder (also 12b/27b: google/gemma-3-12b-it, google/gemma-3-27b-it)"
    )
    dataset_path: str = _f("training_data/train.jsonl", "training JSONL (from convert_eevee_data_v2.py)")
    eval_dataset_path: str = _f("training_data/val.jsonl", "validation JSONL used at eval steps ('' to disable)")
    test_dataset_path: str = _f("training_data/test.jsonl", "held-out JSONL for evaluate.py")
    eevee_data_dir: str = _f("eevee/runs", "Eevee v1 runs/ folder (or its parent)")
    training_data_dir: str = _f("training_data", "where the converter writes JSONL splits")
    output_dir: str = _f("models/pokemon-gemma-lora", "run folder: adapter, checkpoints, metrics.jsonl")
    # --- training
    max_steps: int = _f(-1, "optimizer steps; -1 = derive from --num_epochs")
    num_epochs: float = _f(1.0, "epochs over the training set when --max_steps is -1")
    batch_size: int = _f(1, "micro-batch size per process")
    grad_accum: int = _f(4, "micro-batches per optimizer step")
    learning_rate: float = _f(2e-4, "peak learning rate")
    warmup_ratio: float = _f(0.03, "fraction of steps with linear warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler: str = _f("cosine", "learning-rate schedule", ("cosine", "linear", "constant"))
    max_seq_length: int = _f(2048, "longest token sequence; context text is shortened first, images/answer never")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: str = _f("language", "which projections get LoRA", ("language", "language+vision", "all-linear"))
    init_adapter: str = _f(
        "", "start from this LoRA adapter's weights (continue another run: its r/alpha/targets apply; new optimizer)"
    )
    use_peft: bool = _f(True, "train a LoRA adapter (else full fine-tuning)")
    use_qlora: bool = _f(False, "4-bit nf4 base (QLoRA); needs bitsandbytes")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    mixed_precision: str = _f(
        "",
        "autocast/weights dtype ('' = the accelerate config's, else bf16 on a bf16 CUDA GPU, fp32 otherwise)",
        ("", "no", "bf16", "fp16"),
    )
    frame_layout: str = _f(
        "images", "4 separate images, or one 2x2 grid image (1/4 of the image tokens)", ("images", "grid")
    )
    image_tokens: int = _f(
        0, "Gemma 4: soft tokens per image, 70/140/280/560/1120 (saved with the run's processor; 0 = the model's)"
    )
    eval_steps: int = _f(50, "evaluate every N optimizer steps (0 = only at the end)")
    save_steps: int = _f(50, "checkpoint every N optimizer steps (0 = only at the end)")
    save_total_limit: int = _f(3, "checkpoints kept (oldest removed)")
    logging_steps: int = _f(10, "log every N optimizer steps")
    seed: int = _f(42, "random seed")
    max_grad_norm: float = _f(1.0, "clip the gradient norm (0 = no clipping)")
    eval_max_samples: int = _f(256, "validation samples scored at each eval step (0 = all)")
    eval_batch_size: int = _f(8, "samples per forward pass at eval steps (validation loss and button scoring)")
    dataloader_workers: int = _f(
        1, "processes that decode/collate upcoming micro-batches while the model trains (0 = inline)"
    )
    report_to: str = _f("none", "experiment tracker", ("wandb", "tensorboard", "none"))
    run_name: str = _f("", "run name for trackers ('' = output dir name)")
    accelerate_config: str = _f("accelerate_configs/single_gpu.yaml", "accelerate config for train_gemma3.sh")
    # --- serving, registry
    model_path: str = _f("models/pokemon-gemma-merged", "model folder the server loads")
    host: str = _f("127.0.0.1", "server bind address")
    port: int = _f(8000, "server port")
    max_batch: int = _f(8, "most requests the server's model worker takes at once (score requests share one pass)")
    batch_wait_ms: float = _f(2.0, "how long the server's model worker waits for more requests to join a batch")
    shutdown_grace_s: float = _f(30.0, "on SIGTERM: seconds the server takes to finish queued work (the rest gets 503)")
    registry_db: str = _f("models/registry.db", "SQLite model registry")
    # --- trackers and secrets (never printed)
    wandb_project: str = _f("pokemon-gemma", "W&B project")
    wandb_entity: str = _f("", "W&B entity (team/user)")
    wandb_mode: str = _f("", "W&B mode: online, offline, disabled ('' = wandb's default)")
    huggingface_token: str = _f("", "token for gated models (secret)", secret=True)
    hf_token: str = _f("", "alias of HUGGINGFACE_TOKEN (secret)", secret=True)
    wandb_api_key: str = _f("", "W&B API key (secret)", secret=True)

    @property
    def hub_token(self) -> str | None:
        return self.huggingface_token or self.hf_token or None

    def masked(self) -> dict[str, Any]:
        return mask_secrets(dataclasses.asdict(self))


def _convert(name: str, raw: str, typ: type) -> Any:
    text = raw.strip()
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise SettingsError(f"error: {name}={raw!r} is not a valid {typ.__name__}") from None


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def load_settings(env_file: str | Path | None = ".env", environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then `.env` (if present), then the process environment."""
    environ = os.environ if environ is None else environ
    file_values = dotenv_values(env_file) if env_file and Path(env_file).is_file() else {}
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = f.name.upper()
        raw = environ.get(key, file_values.get(key))
        if raw is None:
            continue
        typ = _field_type(f)
        value = _convert(key, raw, typ)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise SettingsError(f"error: {key}={raw!r} must be one of {', '.join(choices)}")
        values[f.name] = value
    return Settings(**values)


def secret_values(settings: Settings | None = None, environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    found = [environ.get(n, "") for n in SECRET_NAMES]
    if settings is not None:
        found += [getattr(settings, f.name) for f in fields(Settings) if f.metadata.get("secret")]
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


def _is_secret_key(key: str) -> bool:
    upper = key.upper()
    return upper in SECRET_NAMES or any(w in upper for w in ("TOKEN", "API_KEY", "SECRET", "PASSWORD"))


def mask_secrets(obj: Any, secrets: list[str] | None = None) -> Any:
    """Copy of a JSON-like object with secret keys masked and known secret values redacted."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: (MASK if _is_secret_key(str(k)) and v else mask_secrets(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, MASK)
    return obj


class SecretFilter(logging.Filter):
    """Redacts secret values from every log record that passes through a handler."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for s in self.secrets:
            message = message.replace(s, MASK)
        record.msg, record.args = message, None
        return True


def setup_logging(settings: Settings | None = None, level: int = logging.INFO) -> logging.Logger:
    """Root logging to stderr with secrets redacted; returns the package logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(SecretFilter(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger("pokemon_gemma")


def add_settings_args(parser: argparse.ArgumentParser, settings: Settings, names: list[str]) -> None:
    """Add `--name` flags for these settings; defaults come from `.env`/environment."""
    by_name = {f.name: f for f in fields(Settings)}
    for name in names:
        f = by_name[name]
        typ = _field_type(f)
        default = getattr(settings, name)
        shown = MASK if f.metadata.get("secret") and default else default
        help_text = f"{f.metadata['help']} (env {name.upper()}; default: {shown!r})"
        if typ is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(
                f"--{name}", type=typ, default=default, choices=f.metadata.get("choices"), help=help_text
            )


def settings_from_args(settings: Settings, args: argparse.Namespace) -> Settings:
    """Settings with the CLI values laid over them (CLI wins)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    return dataclasses.replace(settings, **overrides)


def load_settings_or_exit(env_file: str | Path | None = ".env") -> Settings:
    try:
        return load_settings(env_file)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
