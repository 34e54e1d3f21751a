"""pipeline_report.md (+ pipeline_accuracy.png): what each stage did and the accuracy side by side."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..fileio import atomic_write_text
from .stages import PLOT_FILE, REPO_ROOT, REPORT_FILE, STAGE_NAMES, Ctx, child_env

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
    if ctx.output("play", "success_rate") is not None:
        rows.append(
            (
                "play success (goals done, demo world)",
                ctx.output("play", "success_rate"),
                ctx.output("play", "play_dir") or "",
            )
        )
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
            env=child_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _plot(ctx: Ctx, rows: list[tuple[str, float | None, str]]) -> Path | None:
    bars = [
        (label, acc)
        for label, acc, _ in rows
        if isinstance(acc, (int, float)) and not label.startswith(("gate", "play"))
    ]
    if not bars:
        return None
    from ..plots import pipeline_accuracy_png

    return pipeline_accuracy_png(bars, ctx.cfg.min_accuracy, ctx.cfg.name, ctx.out / PLOT_FILE)


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
