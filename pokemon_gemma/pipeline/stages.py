"""The production pipeline's stages as data: which script each runs, with which flags, when it is
skipped, what it leaves behind, and when a finished stage may be reused."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import read_json
from ..families import FamilyError, family_of
from ..registry import Registry, RegistryError

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /ready poll is noise

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
STATE_FILE = "pipeline_state.json"
REPORT_FILE = "pipeline_report.md"
PLOT_FILE = "pipeline_accuracy.png"


class PipelineError(RuntimeError):
    """Stops the pipeline; `code` is the exit status (1 failure, 2 usage)."""

    def __init__(self, message: str, code: int = 1, outputs: dict | None = None):
        super().__init__(message)
        self.code = code
        self.outputs = outputs or {}


@dataclass
class PipelineConfig:
    checkpoint: str
    eval_dataset: str
    output_dir: str
    name: str = "pokemon-gemma"
    base_model: str | None = None
    min_accuracy: float = 0.0
    min_play_success: float | None = None  # play gate: goals done / goals asked in the demo world
    play_episodes: int = 20
    serve: bool = False
    keep_serving: bool = False
    port: int = 8000
    host: str = "127.0.0.1"
    registry_db: str = "models/registry.db"
    eval_limit: int | None = None
    export_eval_limit: int | None = None  # the MLX export's evaluation (slow on CPU); None: eval_limit
    eval_batch_size: int = 8
    monitor_checks: int = 3
    merge_dtype: str = "bf16"
    mlx_bits: str = "4"  # 4, 8 or none (passed to convert_to_mlx.py --quantization_bits)
    mlx_verify_samples: int = 32  # the 90% agreement gate needs enough samples to mean something
    wandb: bool = False  # register also logs a W&B model artifact
    skip_stages: tuple[str, ...] = ()
    stage_timeout_s: float = 3600.0
    ready_timeout_s: float = 300.0
    python: str = sys.executable


@dataclass
class Ctx:
    cfg: PipelineConfig
    out: Path
    state: dict[str, Any]

    def entry(self, stage: str) -> dict[str, Any]:
        return self.state["stages"].setdefault(stage, {"status": "pending"})

    def output(self, stage: str, key: str, default: Any = None) -> Any:
        return self.state["stages"].get(stage, {}).get("outputs", {}).get(key, default)

    @property
    def is_adapter(self) -> bool:
        return (Path(self.cfg.checkpoint) / "adapter_config.json").is_file()

    @property
    def model_dir(self) -> str:
        """The full (merged) model every later stage uses."""
        return str(self.out / "merged") if self.is_adapter else str(Path(self.cfg.checkpoint).resolve())

    @property
    def server_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def script(self, name: str) -> str:
        return str(REPO_ROOT / "scripts" / name)


@dataclass
class Stage:
    name: str
    title: str
    script: str | None = None  # scripts/<script>; None = runs in-process
    command: Callable[[Ctx], list[str]] | None = None  # flags after the script
    skip: Callable[[Ctx], str | None] = lambda ctx: None  # a reason to skip, or None to run
    outputs: Callable[[Ctx], dict[str, Any]] = lambda ctx: {}
    fresh_dirs: Callable[[Ctx], list[Path]] = lambda ctx: []  # pipeline-owned folders cleared before a retry
    after: Callable[[Ctx, dict], dict[str, Any]] | None = None  # reads results (accuracy, version) after success
    run: Callable[[Ctx], dict[str, Any]] | None = None  # in-process stages
    still_valid: Callable[[Ctx, dict], bool] = lambda ctx, entry: True  # may a finished stage be skipped?
    background: bool = False  # keeps running (the server)
    needs: tuple[str, ...] = ()  # re-run when one of these ran in this run
    hint: str | None = None  # added to a failure: how to change the stage from the pipeline's flags


# --------------------------------------------------------------------------- stage helpers


def read_accuracy(eval_dir: str | Path) -> float:
    report = Path(eval_dir) / "eval_report.json"
    try:
        value = json.loads(report.read_text())["accuracy"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{report}: no accuracy in the evaluation report ({type(exc).__name__})") from None
    return float(value)


def _eval_flags(ctx: Ctx, model: str, out: str, limit: int | None) -> list[str]:
    flags = ["--model_name", model, "--dataset_path", ctx.cfg.eval_dataset, "--output_dir", out, "--no_progress"]
    flags += ["--batch_size", str(ctx.cfg.eval_batch_size)]
    if limit:
        flags += ["--limit", str(limit)]
    return flags


def _export_eval_limit(ctx: Ctx) -> int | None:
    return ctx.cfg.export_eval_limit or ctx.cfg.eval_limit


def _base_model(ctx: Ctx) -> str:
    if ctx.cfg.base_model:
        return ctx.cfg.base_model
    from ..artifacts import adapter_base_model

    return adapter_base_model(ctx.cfg.checkpoint)


def _files_exist(*keys: str) -> Callable[[Ctx, dict], bool]:
    def check(ctx: Ctx, entry: dict) -> bool:
        return all(Path(entry.get("outputs", {}).get(k, "")).exists() for k in keys)

    return check


def gate(ctx: Ctx) -> dict[str, Any]:
    accuracy = ctx.output("evaluate", "accuracy")
    if accuracy is None:
        raise PipelineError("gate: the evaluate stage recorded no accuracy")
    production = None
    with Registry(ctx.cfg.registry_db) as reg:
        prod = reg.production(ctx.cfg.name)
        if prod is not None:
            production = {"version": prod.version, "accuracy": prod.metrics.get("accuracy"), "path": prod.path}
    result = {
        "accuracy": accuracy,
        "min_accuracy": ctx.cfg.min_accuracy,
        "production": production,
        "min_play_success": ctx.cfg.min_play_success,
        "play_success": ctx.output("play", "success_rate"),
    }
    if ctx.cfg.min_play_success is not None:
        success = result["play_success"]
        if success is None:
            raise PipelineError("gate: the play stage recorded no success rate", outputs=result)
        if success < ctx.cfg.min_play_success:
            raise PipelineError(
                f"gate: play success {success:.4f} is below --min_play_success {ctx.cfg.min_play_success:.4f} "
                f"(not registered; see {ctx.output('play', 'play_dir')}/play_report.md)",
                outputs=result,
            )
    if accuracy < ctx.cfg.min_accuracy:
        raise PipelineError(
            f"gate: accuracy {accuracy:.4f} is below --min_accuracy {ctx.cfg.min_accuracy:.4f} "
            "(not registered; train longer or lower --min_accuracy)",
            outputs=result,
        )
    prod_acc = (production or {}).get("accuracy")
    if isinstance(prod_acc, (int, float)) and accuracy < prod_acc:
        raise PipelineError(
            f"gate: accuracy {accuracy:.4f} is below production {ctx.cfg.name}:v"
            f"{production['version']} ({prod_acc:.4f}) (not registered)",
            outputs=result,
        )
    return result


def read_play(play_dir: str | Path) -> dict[str, Any]:
    report = Path(play_dir) / "play_report.json"
    try:
        model = json.loads(report.read_text())["policies"]["model"]
        return {"success_rate": float(model["success_rate"]), "steps_ratio": model["steps_ratio"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{report}: no model success rate in the play report ({type(exc).__name__})") from None


def _mlx_unsupported(ctx: Ctx) -> str | None:
    """The family's reason mlx-vlm cannot export the merged model (None: export it)."""
    config = read_json(Path(ctx.model_dir) / "config.json")
    try:
        return family_of(config.get("model_type")).mlx_unsupported_reason(config) if config else None
    except FamilyError:
        return None  # the export stage itself names what is wrong with the folder


def _export_flags(ctx: Ctx) -> list[str]:
    flags = [
        "--model_path",
        ctx.model_dir,
        "--output_path",
        str(ctx.out / "mlx"),
        "--quantization_bits",
        ctx.cfg.mlx_bits,
        "--verify_data",
        ctx.cfg.eval_dataset,
        "--verify_samples",
        str(ctx.cfg.mlx_verify_samples),
    ]
    return flags


def _register_flags(ctx: Ctx) -> list[str]:
    tags = [f"pipeline={ctx.out}", f"checkpoint={Path(ctx.cfg.checkpoint).resolve()}"]
    if ctx.output("export_mlx", "mlx_dir"):
        tags.append(f"mlx_path={ctx.output('export_mlx', 'mlx_dir')}")
    if ctx.output("evaluate_export", "accuracy") is not None:
        tags.append(f"mlx_accuracy={ctx.output('evaluate_export', 'accuracy'):.4f}")
    flags = [
        "--registry_db",
        ctx.cfg.registry_db,
        "register",
        "--name",
        ctx.cfg.name,
        "--checkpoint",
        ctx.model_dir,
        "--metrics",
        str(Path(ctx.output("evaluate", "eval_dir")) / "eval_report.json"),
        "--on_duplicate",
        "reuse",
        "--json",
        "--tags",
        *tags,
    ]
    if ctx.is_adapter:
        flags += ["--base_model", _base_model(ctx)]
    if ctx.cfg.wandb:
        flags.append("--wandb")
    return flags


def _after_register(ctx: Ctx, result: dict) -> dict[str, Any]:
    try:
        doc = json.loads(result["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PipelineError("register: model_registry.py printed no JSON version") from None
    return {"version": doc["version"], "reused_existing": not doc["created"], "sha256": doc["sha256"]}


def _promote_stage(ctx: Ctx) -> str:
    return "production" if ctx.cfg.serve else "staging"


def _promote_skip(ctx: Ctx) -> str | None:
    """Never demote: a version already in production (or at the target stage) stays where it is."""
    version = ctx.output("register", "version")
    try:
        with Registry(ctx.cfg.registry_db) as reg:
            current = reg.get(ctx.cfg.name, version).stage
    except RegistryError as exc:
        raise PipelineError(f"promote: {exc}") from None
    if current == _promote_stage(ctx) or current == "production":
        return f"{ctx.cfg.name}:v{version} is already {current}"
    return None


def _server_alive(ctx: Ctx, entry: dict) -> bool:
    pid = entry.get("outputs", {}).get("pid")
    return bool(pid) and pid_alive(pid) and server_ready(entry["outputs"]["url"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def server_ready(url: str, timeout: float = 5.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


STAGES: list[Stage] = [
    Stage(
        "merge",
        "merge the LoRA adapter into its base",
        "merge_qlora.py",
        command=lambda ctx: [
            "--base_model",
            _base_model(ctx),
            "--lora_path",
            ctx.cfg.checkpoint,
            "--output_path",
            str(ctx.out / "merged"),
            "--dtype",
            ctx.cfg.merge_dtype,
            "--verify_data",
            ctx.cfg.eval_dataset,
        ],
        skip=lambda ctx: None if ctx.is_adapter else "checkpoint is a full model (no adapter_config.json)",
        outputs=lambda ctx: {"model_dir": str(ctx.out / "merged")},
        fresh_dirs=lambda ctx: [ctx.out / "merged"],
        still_valid=_files_exist("model_dir"),
    ),
    Stage(
        "evaluate",
        "evaluate the merged model",
        "evaluate.py",
        command=lambda ctx: _eval_flags(ctx, ctx.model_dir, str(ctx.out / "eval" / "merged"), ctx.cfg.eval_limit),
        outputs=lambda ctx: {"eval_dir": str(ctx.out / "eval" / "merged")},
        fresh_dirs=lambda ctx: [ctx.out / "eval" / "merged"],
        needs=("merge",),
        after=lambda ctx, r: {"accuracy": read_accuracy(ctx.out / "eval" / "merged")},
        still_valid=_files_exist("eval_dir"),
    ),
    Stage(
        "play",
        "play evaluation in the demo world (--min_play_success)",
        "play.py",
        command=lambda ctx: [
            "--model_path",
            ctx.model_dir,
            "--policy",
            "model",
            "--episodes",
            str(ctx.cfg.play_episodes),
            "--output_dir",
            str(ctx.out / "play"),
            "--gif",
            "2",
            "--no_progress",
        ],
        skip=lambda ctx: None if ctx.cfg.min_play_success is not None else "--min_play_success not given",
        outputs=lambda ctx: {"play_dir": str(ctx.out / "play")},
        fresh_dirs=lambda ctx: [ctx.out / "play"],
        needs=("merge",),
        after=lambda ctx, r: read_play(ctx.out / "play"),
        still_valid=_files_exist("play_dir"),
    ),
    Stage(
        "gate",
        "accuracy gate (--min_accuracy and the production version)",
        run=gate,
        needs=("evaluate", "play"),
        still_valid=lambda ctx, e: (
            (e.get("outputs", {}).get("min_accuracy"), e.get("outputs", {}).get("min_play_success"))
            == (ctx.cfg.min_accuracy, ctx.cfg.min_play_success)
        ),
    ),
    Stage(
        "export_mlx",
        "export the merged model to MLX",
        "convert_to_mlx.py",
        command=_export_flags,
        skip=_mlx_unsupported,
        outputs=lambda ctx: {"mlx_dir": str(ctx.out / "mlx")},
        fresh_dirs=lambda ctx: [ctx.out / "mlx"],
        still_valid=_files_exist("mlx_dir"),
        needs=("merge",),
        hint="from the pipeline: --mlx_bits 8|none, or --skip_stages export_mlx,evaluate_export",
    ),
    Stage(
        "evaluate_export",
        "evaluate the MLX export",
        "evaluate.py",
        command=lambda ctx: _eval_flags(
            ctx, ctx.output("export_mlx", "mlx_dir"), str(ctx.out / "eval" / "mlx"), _export_eval_limit(ctx)
        ),
        skip=lambda ctx: None if ctx.output("export_mlx", "mlx_dir") else "no MLX export",
        outputs=lambda ctx: {"eval_dir": str(ctx.out / "eval" / "mlx"), "limit": _export_eval_limit(ctx)},
        fresh_dirs=lambda ctx: [ctx.out / "eval" / "mlx"],
        needs=("export_mlx",),
        after=lambda ctx, r: {"accuracy": read_accuracy(ctx.out / "eval" / "mlx")},
        # Another --export_eval_limit re-evaluates the export.
        still_valid=lambda ctx, e: (
            _files_exist("eval_dir")(ctx, e) and e.get("outputs", {}).get("limit") == _export_eval_limit(ctx)
        ),
    ),
    Stage(
        "register",
        "register the version with its metrics",
        "model_registry.py",
        command=_register_flags,
        after=_after_register,
        needs=("merge", "evaluate", "evaluate_export"),
    ),
    Stage(
        "serve",
        "start the inference server",
        "inference_server.py",
        command=lambda ctx: [
            "--model_path",
            ctx.model_dir,
            "--host",
            ctx.cfg.host,
            "--port",
            str(ctx.cfg.port),
            "--model_version",
            f"{ctx.cfg.name}:v{ctx.output('register', 'version')}",
        ],
        skip=lambda ctx: None if ctx.cfg.serve else "--serve not given",
        outputs=lambda ctx: {"url": ctx.server_url},
        still_valid=lambda ctx, e: _server_alive(ctx, e) or ctx.entry("monitor").get("status") == "done",
        background=True,
        needs=("register",),
    ),
    Stage(
        "monitor",
        "health-check the running server",
        "health_monitor.py",
        command=lambda ctx: [
            "--server_url",
            ctx.output("serve", "url"),
            "--max_checks",
            str(ctx.cfg.monitor_checks),
            "--interval",
            "1",
            "--output",
            str(ctx.out / "monitor.jsonl"),
        ],
        skip=lambda ctx: None if ctx.cfg.serve else "--serve not given",
        outputs=lambda ctx: {"status_log": str(ctx.out / "monitor.jsonl")},
        needs=("serve",),
    ),
    Stage(
        "promote",
        "promote the version (production after a healthy server, else staging)",
        "model_registry.py",
        command=lambda ctx: [
            "--registry_db",
            ctx.cfg.registry_db,
            "promote",
            ctx.cfg.name,
            "--version",
            str(ctx.output("register", "version")),
            "--stage",
            _promote_stage(ctx),
            "--note",
            f"pipeline {ctx.out}",
        ],
        skip=_promote_skip,
        outputs=lambda ctx: {"stage": _promote_stage(ctx), "version": ctx.output("register", "version")},
        needs=("register", "monitor"),
    ),
]
STAGE_NAMES = [s.name for s in STAGES]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
