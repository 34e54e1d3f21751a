"""Production pipeline: merge -> evaluate -> gate -> export MLX -> evaluate export -> register
[-> serve -> health monitor] -> promote, each stage a real CLI run as a subprocess.

The stage list (`STAGES`) is data: each entry says which script it runs, with which flags, when it
is skipped and what it leaves behind. Every status change is written atomically to
`OUTPUT_DIR/pipeline_state.json`; a re-run skips stages that are done (and whose outputs are still
there), so a pipeline that failed half-way resumes where it stopped. The registry is only ever
added to (register reuses a version with the same weights), so a failed run loses nothing.
`OUTPUT_DIR/pipeline_report.md` (+ `pipeline_accuracy.png`) is rewritten at the end of every run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json, atomic_write_text
from .registry import Registry, RegistryError, now_iso

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /ready poll is noise

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    serve: bool = False
    keep_serving: bool = False
    port: int = 8000
    host: str = "127.0.0.1"
    registry_db: str = "models/registry.db"
    eval_limit: int | None = None
    monitor_checks: int = 3
    merge_dtype: str = "bf16"
    mlx_bits: str = "4"  # 4, 8 or none (passed to convert_to_mlx.py --quantization_bits)
    mlx_verify_samples: int | None = None
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


# --------------------------------------------------------------------------- stage helpers


def read_accuracy(eval_dir: str | Path) -> float:
    report = Path(eval_dir) / "eval_report.json"
    try:
        value = json.loads(report.read_text())["accuracy"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{report}: no accuracy in the evaluation report ({type(exc).__name__})") from None
    return float(value)


def _eval_flags(ctx: Ctx, model: str, out: str) -> list[str]:
    flags = ["--model_name", model, "--dataset_path", ctx.cfg.eval_dataset, "--output_dir", out, "--no_progress"]
    if ctx.cfg.eval_limit:
        flags += ["--limit", str(ctx.cfg.eval_limit)]
    return flags


def _base_model(ctx: Ctx) -> str:
    if ctx.cfg.base_model:
        return ctx.cfg.base_model
    from .modeling import adapter_base_model

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
    result = {"accuracy": accuracy, "min_accuracy": ctx.cfg.min_accuracy, "production": production}
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
    ]
    if ctx.cfg.mlx_verify_samples:
        flags += ["--verify_samples", str(ctx.cfg.mlx_verify_samples)]
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
    return bool(pid) and _pid_alive(pid) and _ready(entry["outputs"]["url"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _ready(url: str, timeout: float = 5.0) -> bool:
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
        command=lambda ctx: _eval_flags(ctx, ctx.model_dir, str(ctx.out / "eval" / "merged")),
        outputs=lambda ctx: {"eval_dir": str(ctx.out / "eval" / "merged")},
        fresh_dirs=lambda ctx: [ctx.out / "eval" / "merged"],
        needs=("merge",),
        after=lambda ctx, r: {"accuracy": read_accuracy(ctx.out / "eval" / "merged")},
        still_valid=_files_exist("eval_dir"),
    ),
    Stage(
        "gate",
        "accuracy gate (--min_accuracy and the production version)",
        run=gate,
        needs=("evaluate",),
        still_valid=lambda ctx, e: e.get("outputs", {}).get("min_accuracy") == ctx.cfg.min_accuracy,
    ),
    Stage(
        "export_mlx",
        "export the merged model to MLX",
        "convert_to_mlx.py",
        command=_export_flags,
        outputs=lambda ctx: {"mlx_dir": str(ctx.out / "mlx")},
        fresh_dirs=lambda ctx: [ctx.out / "mlx"],
        still_valid=_files_exist("mlx_dir"),
        needs=("merge",),
    ),
    Stage(
        "evaluate_export",
        "evaluate the MLX export",
        "evaluate.py",
        command=lambda ctx: _eval_flags(ctx, ctx.output("export_mlx", "mlx_dir"), str(ctx.out / "eval" / "mlx")),
        skip=lambda ctx: None if ctx.output("export_mlx", "mlx_dir") else "no MLX export",
        outputs=lambda ctx: {"eval_dir": str(ctx.out / "eval" / "mlx")},
        fresh_dirs=lambda ctx: [ctx.out / "eval" / "mlx"],
        needs=("export_mlx",),
        after=lambda ctx, r: {"accuracy": read_accuracy(ctx.out / "eval" / "mlx")},
        still_valid=_files_exist("eval_dir"),
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


# --------------------------------------------------------------------------- state


def _fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    """Inputs that make a finished stage reusable; another checkpoint or dataset means another pipeline."""
    return {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "eval_dataset": str(Path(cfg.eval_dataset).resolve()),
        "name": cfg.name,
        "base_model": cfg.base_model,
        "eval_limit": cfg.eval_limit,
        "registry_db": str(Path(cfg.registry_db).resolve()),
    }


def load_state(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    inputs = _fingerprint(cfg)
    if not path.is_file():
        return {"inputs": inputs, "created_at": now_iso(), "runs": [], "stages": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(
            f"{path}:{getattr(exc, 'lineno', 1)}: unreadable state ({exc}) (delete it to start over)", code=2
        ) from None
    changed = [k for k, v in inputs.items() if state.get("inputs", {}).get(k) != v]
    if changed:
        raise PipelineError(
            f"{path}: this folder holds a pipeline with other inputs ({', '.join(changed)} differ; "
            "use another --output_dir, or --restart to start over here)",
            code=2,
        )
    return state


def save_state(ctx: Ctx) -> None:
    ctx.state["updated_at"] = now_iso()
    atomic_write_json(ctx.out / STATE_FILE, ctx.state)


# --------------------------------------------------------------------------- running


def _last_lines(path: Path, n: int = 5) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1] if errors else " | ".join(lines[-n:]))[:500]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_subprocess(ctx: Ctx, stage: Stage, argv: list[str], log_path: Path) -> dict[str, Any]:
    with open(log_path, "w") as log_fh:
        log_fh.write("$ " + " ".join(argv) + "\n")
        log_fh.flush()
        try:
            proc = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=log_fh,
                text=True,
                cwd=REPO_ROOT,
                env=_child_env(),
                timeout=ctx.cfg.stage_timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise PipelineError(
                f"stage {stage.name} timed out after {ctx.cfg.stage_timeout_s:.0f} s (log: {log_path})"
            ) from None
        log_fh.write(proc.stdout)
    if proc.returncode != 0:
        why = _last_lines(log_path)
        raise PipelineError(f"stage {stage.name} failed (exit {proc.returncode}): {why} (log: {log_path})")
    return {"stdout": proc.stdout, "returncode": proc.returncode}


def _start_background(ctx: Ctx, stage: Stage, argv: list[str], log_path: Path) -> dict[str, Any]:
    log_fh = open(log_path, "w")
    log_fh.write("$ " + " ".join(argv) + "\n")
    log_fh.flush()
    # Own session: stopping the server later kills its whole process group, nothing else.
    proc = subprocess.Popen(
        argv, stdout=log_fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_child_env(), start_new_session=True
    )
    log_fh.close()
    url = ctx.server_url
    deadline = time.time() + ctx.cfg.ready_timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise PipelineError(
                f"stage {stage.name} failed: the server exited with {proc.returncode} before it was "
                f"ready: {_last_lines(log_path)} (log: {log_path})"
            )
        if _ready(url, timeout=2.0):
            return {"pid": proc.pid, "url": url}
        time.sleep(0.5)
    stop_server(proc.pid)
    raise PipelineError(
        f"stage {stage.name} failed: {url}/ready not 200 after {ctx.cfg.ready_timeout_s:.0f} s (log: {log_path})"
    )


def stop_server(pid: int, timeout: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and _pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if _pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _command(ctx: Ctx, stage: Stage) -> list[str] | None:
    if stage.command is None:
        return None
    try:
        return [ctx.cfg.python, ctx.script(stage.script), *stage.command(ctx)]
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"stage {stage.name}: cannot build its command ({exc})") from None


def _reusable(ctx: Ctx, stage: Stage, entry: dict, ran: set[str]) -> bool:
    """A finished stage is reused when nothing it depends on ran again, its command (flags) is the same
    and its outputs are still there."""
    if entry.get("status") != "done" or any(n in ran for n in stage.needs):
        return False
    if entry.get("status") == "done" and stage.command is not None and not stage.background:
        if entry.get("command") != " ".join(_command(ctx, stage)[1:]):
            return False
    return stage.still_valid(ctx, entry)


def run_stage(
    ctx: Ctx, stage: Stage, index: int, total: int, echo: Callable[[str], None], ran: set[str] | None = None
) -> bool:
    """Run one stage unless it is finished (or skipped); True when it ran."""
    entry = ctx.entry(stage.name)
    prefix = f"[{index}/{total}] {stage.name}"
    # Finished work is reused; anything else re-checks its skip condition (--serve may come and go).
    if _reusable(ctx, stage, entry, ran or set()):
        entry["skipped_on_rerun"] = entry.get("skipped_on_rerun", 0) + 1
        save_state(ctx)
        echo(f"{prefix}: done earlier, skipped")
        return False
    reason = "skipped with --skip_stages" if stage.name in ctx.cfg.skip_stages else stage.skip(ctx)
    if reason:
        ctx.state["stages"][stage.name] = {
            "status": "skipped",
            "reason": reason,
            "started_at": now_iso(),
            "ended_at": now_iso(),
            "seconds": 0.0,
            "outputs": {},
        }
        save_state(ctx)
        echo(f"{prefix}: skipped ({reason})")
        return False
    started = time.time()
    entry.clear()
    entry.update({"status": "running", "started_at": now_iso(), "title": stage.title})
    save_state(ctx)
    log_path = ctx.out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stage.run is not None:
            echo(f"{prefix}: {stage.title} ...")
            outputs = stage.run(ctx)
        else:
            script = ctx.script(stage.script)
            if not Path(script).is_file():
                raise PipelineError(
                    f"stage {stage.name}: scripts/{stage.script} is not in this checkout (stage not "
                    f"available; --skip_stages {stage.name} goes on without it)"
                )
            for folder in stage.fresh_dirs(ctx):  # a half-written output of an earlier failed try
                shutil.rmtree(folder, ignore_errors=True)
            argv = _command(ctx, stage)
            entry["command"] = " ".join(argv[1:])
            save_state(ctx)
            echo(f"{prefix}: {stage.title} ... (log: {log_path})")
            if stage.background:
                result = _start_background(ctx, stage, argv, log_path)
                outputs = {**stage.outputs(ctx), **result}
            else:
                result = _run_subprocess(ctx, stage, argv, log_path)
                outputs = {**stage.outputs(ctx), **(stage.after(ctx, result) if stage.after else {})}
    except PipelineError as exc:
        entry.update(
            {
                "status": "failed",
                "ended_at": now_iso(),
                "seconds": round(time.time() - started, 2),
                "error": str(exc),
                "outputs": exc.outputs,
            }
        )
        save_state(ctx)
        raise
    except BaseException as exc:  # Ctrl-C or a bug: the state still says where it stopped
        entry.update(
            {
                "status": "failed",
                "ended_at": now_iso(),
                "seconds": round(time.time() - started, 2),
                "error": f"{type(exc).__name__}: {exc}",
            }
        )
        save_state(ctx)
        raise
    entry.update(
        {"status": "done", "ended_at": now_iso(), "seconds": round(time.time() - started, 2), "outputs": outputs}
    )
    save_state(ctx)
    echo(f"{prefix}: done in {entry['seconds']:.1f} s" + _summary(outputs))
    return True


def _summary(outputs: dict) -> str:
    parts = [
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in outputs.items()
        if k in ("accuracy", "version", "stage", "url")
    ]
    return f" ({', '.join(parts)})" if parts else ""


class _Lock:
    """One pipeline per output folder at a time (a second run would fight over the same files)."""

    def __init__(self, out: Path):
        self.path = out / ".pipeline.lock"

    def __enter__(self):
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise PipelineError(f"{self.path.parent}: another pipeline is running in this folder", code=1) from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def validate_config(cfg: PipelineConfig) -> None:
    ckpt = Path(cfg.checkpoint)
    if not ckpt.is_dir():
        raise PipelineError(f"{ckpt}: checkpoint folder not found (pass a trained run folder or merged model)", code=2)
    if not (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").is_file():
        raise PipelineError(
            f"{ckpt}: neither adapter_config.json nor config.json (not a LoRA adapter or model folder)", code=2
        )
    if not Path(cfg.eval_dataset).is_file():
        raise PipelineError(f"{cfg.eval_dataset}: evaluation JSONL not found (pass --eval_dataset)", code=2)
    unknown = [s for s in cfg.skip_stages if s not in STAGE_NAMES]
    if unknown:
        raise PipelineError(
            f"--skip_stages: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGE_NAMES)})", code=2
        )
    if "gate" in cfg.skip_stages or "register" in cfg.skip_stages:
        raise PipelineError("--skip_stages: gate and register cannot be skipped", code=2)
    if not 0.0 <= cfg.min_accuracy <= 1.0:
        raise PipelineError(f"--min_accuracy {cfg.min_accuracy} is not between 0 and 1", code=2)


def run_pipeline(cfg: PipelineConfig, *, restart: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline; returns the final state. Raises PipelineError on the first failure,
    after writing the state and the report."""
    validate_config(cfg)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        if restart:
            (out / STATE_FILE).unlink(missing_ok=True)
        ctx = Ctx(cfg, out, load_state(cfg, out))
        ctx.state["runs"].append({"started_at": now_iso(), "min_accuracy": cfg.min_accuracy, "serve": cfg.serve})
        save_state(ctx)
        started_server = None
        ran_now: set[str] = set()
        failure: PipelineError | None = None
        try:
            for i, stage in enumerate(STAGES, start=1):
                ran = run_stage(ctx, stage, i, len(STAGES), echo, ran_now)
                if ran:
                    ran_now.add(stage.name)
                if ran and stage.background:  # only a server this run started is stopped by it
                    started_server = ctx.output(stage.name, "pid")
        except PipelineError as exc:
            failure = exc
        finally:
            if started_server and _pid_alive(started_server):
                if cfg.keep_serving and failure is None:
                    echo(
                        f"server left running at {ctx.server_url} (pid {started_server}; stop it with "
                        f"kill -TERM -{started_server})"
                    )
                else:
                    stop_server(started_server)
                    ctx.entry("serve").setdefault("outputs", {})["stopped_at"] = now_iso()
                    echo(f"server (pid {started_server}) stopped")
            ctx.state["runs"][-1].update(
                {
                    "ended_at": now_iso(),
                    "result": "failed" if failure else "ok",
                    "error": str(failure) if failure else None,
                }
            )
            save_state(ctx)
            write_report(ctx)
        if failure is not None:
            raise failure
        return ctx.state


# --------------------------------------------------------------------------- report


def accuracy_rows(ctx: Ctx) -> list[tuple[str, float | None, str]]:
    rows = [
        (
            "merged model" if ctx.is_adapter else "model",
            ctx.output("evaluate", "accuracy"),
            ctx.output("evaluate", "eval_dir") or "",
        ),
        ("MLX export", ctx.output("evaluate_export", "accuracy"), ctx.output("evaluate_export", "eval_dir") or ""),
    ]
    prod = ctx.output("gate", "production")
    if prod:
        rows.append(
            (
                f"production before this run ({ctx.cfg.name}:v{prod['version']})",
                prod.get("accuracy"),
                prod.get("path") or "",
            )
        )
    rows.append(("gate: --min_accuracy", ctx.cfg.min_accuracy, ""))
    return rows


def _compare_table(ctx: Ctx) -> str | None:
    """evaluate.py --compare's own side-by-side table of every evaluation this pipeline ran."""
    dirs = [
        d
        for d in (ctx.output("evaluate", "eval_dir"), ctx.output("evaluate_export", "eval_dir"))
        if d and (Path(d) / "eval_report.json").is_file()
    ]
    script = ctx.script("evaluate.py")
    if not dirs or not Path(script).is_file():
        return None
    try:
        proc = subprocess.run(
            [ctx.cfg.python, script, "--compare", *dirs],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
            env=_child_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _plot(ctx: Ctx, rows: list[tuple[str, float | None, str]]) -> Path | None:
    bars = [(label, acc) for label, acc, _ in rows if isinstance(acc, (int, float)) and not label.startswith("gate")]
    if not bars:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4c72b0")
    ax.axvline(ctx.cfg.min_accuracy, color="#c44e52", linestyle="--", label=f"--min_accuracy {ctx.cfg.min_accuracy:g}")
    for y, (_, acc) in enumerate(bars):
        ax.text(acc, y, f" {acc:.3f}", va="center")
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("button accuracy")
    ax.set_title(f"{ctx.cfg.name}: accuracy by stage")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = ctx.out / PLOT_FILE
    tmp = ctx.out / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(ctx: Ctx) -> Path:
    rows = accuracy_rows(ctx)
    run = ctx.state["runs"][-1]
    lines = [
        f"# Production pipeline: {ctx.cfg.name}",
        "",
        f"- checkpoint: `{ctx.state['inputs']['checkpoint']}`",
        f"- evaluation data: `{ctx.state['inputs']['eval_dataset']}`",
        f"- registry: `{ctx.state['inputs']['registry_db']}`",
        f"- this run: {run['started_at']} → {run.get('ended_at', '?')}: **{run.get('result', 'running')}**"
        + (f" — {run['error']}" if run.get("error") else ""),
        "",
        "## Stages",
        "",
        "| # | stage | status | started | ended | seconds | outputs |",
        "|---|---|---|---|---|---:|---|",
    ]
    for i, name in enumerate(STAGE_NAMES, start=1):
        e = ctx.state["stages"].get(name, {"status": "not reached"})
        outs = e.get("outputs") or {}
        shown = ", ".join(
            f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in outs.items() if k != "production"
        ) or e.get("reason", "")
        if e.get("error"):
            shown = (shown + "; " if shown else "") + f"error: {e['error']}"
        if e.get("skipped_on_rerun"):
            shown += f" (reused on {e['skipped_on_rerun']} re-run(s))"
        lines.append(
            f"| {i} | {name} | {e['status']} | {e.get('started_at', '')} | {e.get('ended_at', '')} | "
            f"{e.get('seconds', '')} | {shown.replace('|', '/')} |"
        )
    lines += ["", "## Accuracy side by side", "", "| model | accuracy | evaluation |", "|---|---:|---|"]
    for label, acc, where in rows:
        lines.append(
            f"| {label} | {acc:.4f} | {where} |" if isinstance(acc, (int, float)) else f"| {label} | — | {where} |"
        )
    compare = _compare_table(ctx)
    if compare:
        lines += ["", "`evaluate.py --compare`:", "", "```", compare, "```"]
    plot = _plot(ctx, rows)
    if plot:
        lines += ["", f"![accuracy]({plot.name})"]
    reg = ctx.output("register", "version")
    if reg is not None:
        lines += [
            "",
            f"Registered as **{ctx.cfg.name}:v{reg}**"
            + (" (same weights were already registered)" if ctx.output("register", "reused_existing") else "")
            + (f", promoted to **{ctx.output('promote', 'stage')}**" if ctx.output("promote", "stage") else "")
            + f". Inspect: `python scripts/model_registry.py --registry_db {ctx.cfg.registry_db} show "
            f"{ctx.cfg.name}:{reg}`",
        ]
    path = ctx.out / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
