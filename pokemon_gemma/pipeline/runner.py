"""Production pipeline: merge -> evaluate [-> play] -> gate -> export MLX -> evaluate export -> register
[-> serve -> health monitor] -> promote, each stage a real CLI run as a subprocess.

The stage list (`STAGES`) is data: each entry says which script it runs, with which flags, when it
is skipped and what it leaves behind. Every status change is written atomically to
`OUTPUT_DIR/pipeline_state.json`; a re-run skips stages that are done (and whose outputs are still
there), so a pipeline that failed half-way resumes where it stopped. The registry is only ever
added to (register reuses a version with the same weights), so a failed run loses nothing.
`OUTPUT_DIR/pipeline_report.md` (+ `pipeline_accuracy.png`) is rewritten at the end of every run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, now_iso
from .report import write_report
from .stages import (
    REPO_ROOT,
    STAGE_NAMES,
    STAGES,
    STATE_FILE,
    Ctx,
    PipelineConfig,
    PipelineError,
    Stage,
    child_env,
    pid_alive,
    server_ready,
)

log = logging.getLogger(__name__)

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
                env=child_env(),
                timeout=ctx.cfg.stage_timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise PipelineError(
                f"stage {stage.name} timed out after {ctx.cfg.stage_timeout_s:.0f} s (log: {log_path})"
            ) from None
        log_fh.write(proc.stdout)
    if proc.returncode != 0:
        why = _last_lines(log_path)
        hint = f"; {stage.hint}" if stage.hint else ""
        raise PipelineError(f"stage {stage.name} failed (exit {proc.returncode}): {why} (log: {log_path}{hint})")
    return {"stdout": proc.stdout, "returncode": proc.returncode}


def _start_background(ctx: Ctx, stage: Stage, argv: list[str], log_path: Path) -> dict[str, Any]:
    log_fh = open(log_path, "w")
    log_fh.write("$ " + " ".join(argv) + "\n")
    log_fh.flush()
    # Own session: stopping the server later kills its whole process group, nothing else.
    proc = subprocess.Popen(
        argv, stdout=log_fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env(), start_new_session=True
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
        if server_ready(url, timeout=2.0):
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
    while time.time() < deadline and pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if pid_alive(pid):
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
        if entry.get("status") == "skipped" and entry.get("reason") == reason:
            echo(f"{prefix}: skipped ({reason})")  # same reason as last run: keep its record
            return False
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
    if cfg.min_play_success is not None and not 0.0 <= cfg.min_play_success <= 1.0:
        raise PipelineError(f"--min_play_success {cfg.min_play_success} is not between 0 and 1", code=2)


def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Every path resolved once against the caller's folder: the stages run with another working
    directory, and each must read the registry (and the rest) the caller named."""
    base = cfg.base_model
    if base and Path(base).exists():  # a local folder; anything else is a hub id
        base = str(Path(base).resolve())
    return dataclasses.replace(
        cfg,
        checkpoint=str(Path(cfg.checkpoint).resolve()),
        eval_dataset=str(Path(cfg.eval_dataset).resolve()),
        output_dir=str(Path(cfg.output_dir).resolve()),
        registry_db=str(Path(cfg.registry_db).resolve()),
        base_model=base,
    )


def _is_our_server(pid: int) -> bool:
    try:
        return b"inference_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid_alive(pid)  # no /proc (macOS): trust the recorded pid


def stop_orphan_server(ctx: Ctx, echo: Callable[[str], None]) -> None:
    """A run killed after starting its server left it running: stop it, and serve and monitor run again."""
    runs = ctx.state["runs"]
    if not runs or "ended_at" in runs[-1]:
        return  # the last run ended: a server it left is there on purpose (--keep_serving)
    pid = ctx.output("serve", "pid")
    if pid and pid_alive(pid) and _is_our_server(pid):
        stop_server(pid)
        echo(f"serve: stopped the server (pid {pid}) a killed run left running; serve and monitor run again")
    for name in ("serve", "monitor"):
        if name in ctx.state["stages"]:
            ctx.state["stages"][name] = {"status": "pending"}


def run_pipeline(cfg: PipelineConfig, *, restart: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline; returns the final state. Raises PipelineError on the first failure,
    after writing the state and the report."""
    cfg = resolve_paths(cfg)
    validate_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        if restart:
            (out / STATE_FILE).unlink(missing_ok=True)
        ctx = Ctx(cfg, out, load_state(cfg, out))
        stop_orphan_server(ctx, echo)
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
            if started_server and pid_alive(started_server):
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
