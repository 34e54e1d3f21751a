"""PNG figures for people: confusion matrix, accuracy per scene context, training curves.

Matplotlib's Agg backend (no display needed); each figure is rendered to memory and written
atomically, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_write_bytes  # noqa: E402


def save_png(fig, path: str | Path) -> Path:
    """Render a figure to PNG in memory, close it, and write the file atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def confusion_matrix_png(
    matrix: list[list[int]],
    labels: list[str],
    predicted_labels: list[str] | None,
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Counts with row-normalised colour (a rare button's row is as readable as a common one)."""
    cols = predicted_labels or labels
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 1.0 + 0.7 * len(labels)))
    shares = [[v / max(1, sum(row)) for v in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if shares[i][j] > 0.55 else "black",
                )
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)


def accuracy_by_context_png(
    by_context: dict[str, dict[str, Any]],
    path: str | Path,
    *,
    overall: float | None = None,
    baselines: dict[str, float] | None = None,
    title: str = "Accuracy by scene context",
) -> Path:
    """One bar per context (labelled with its sample count); overall and baselines as lines."""
    names = list(by_context) or ["(none)"]
    accs = [by_context[n]["accuracy"] for n in by_context] or [0.0]
    counts = [by_context[n]["n"] for n in by_context] or [0]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2.5), 4.0))
    bars = ax.bar(range(len(names)), accs, color="#4C72B0")
    for bar, n, a in zip(bars, counts, accs):
        ax.text(bar.get_x() + bar.get_width() / 2, a + 0.02, f"{a:.2f}\nn={n}", ha="center", va="bottom", fontsize=8)
    styles = iter([("#DD8452", "--"), ("#8172B3", ":"), ("grey", "-.")])
    if overall is not None:
        ax.axhline(overall, color="black", lw=1.2, label=f"model overall {overall:.2f}")
    for name, acc in (baselines or {}).items():
        color, ls = next(styles, ("grey", "--"))
        ax.axhline(acc, color=color, lw=1.2, ls=ls, label=f"{name} {acc:.2f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return save_png(fig, path)


def training_curves_png(rows: list[dict[str, Any]], path: str | Path, title: str = "Training") -> Path:
    """Train/val loss, val accuracy and learning rate against the optimizer step."""

    def series(key):
        pts = [
            (r["step"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float))
            and "step" in r
            and not (isinstance(r[key], float) and math.isnan(r[key]))
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    for key, label, style in (("train/loss", "train loss", "-"), ("eval/loss", "val loss", "o-")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, style, label=label, ms=4)
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    xs, ys = series("eval/accuracy")
    if xs:
        ax_acc.plot(xs, ys, "o-", color="#55A868", ms=4)
    else:
        ax_acc.text(0.5, 0.5, "no eval steps logged", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("val accuracy")
    xs, ys = series("lr")
    if xs:
        ax_lr.plot(xs, ys, color="#C44E52")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


class PlotError(ValueError):
    """The input of a plot is missing or malformed; the message names the file (and line)."""


def plot_training_run(run_dir: str | Path) -> Path:
    """Read `run_dir/metrics.jsonl` and write `run_dir/training_curves.png`."""
    from .fileio import JsonlError, iter_jsonl

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{metrics}: file not found (is {run_dir} a training run folder?)")
    try:
        numbered = list(iter_jsonl(metrics))
    except JsonlError as exc:
        raise PlotError(str(exc)) from None
    for lineno, row in numbered:
        if not isinstance(row.get("step"), (int, float)):
            raise PlotError(f"{metrics}:{lineno}: step: missing or not a number (each line needs a numeric step)")
    rows = [row for _, row in numbered]
    if not rows:
        raise PlotError(f"{metrics}: no rows logged yet")
    return training_curves_png(rows, run_dir / "training_curves.png", title=f"Training — {run_dir.name}")


def batch_size_png(
    results: list[dict[str, Any]],
    path: str | Path,
    *,
    limit_gb: float | None = None,
    budget_gb: float | None = None,
    recommended: int | None = None,
    title: str = "Batch-size probes",
) -> Path:
    """Peak memory (fits green, no fit red) against the limit, and throughput, per micro-batch size."""
    fig, (ax_mem, ax_tp) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        peak = r.get("peak_memory_gb")
        if peak is None:  # OOM: no peak measured; mark it at the top of the axis
            ax_mem.axvline(r["batch_size"], color="#C44E52", ls=":", lw=1)
        else:
            ax_mem.plot(
                r["batch_size"], peak, "o" if r["fits"] else "x", ms=7, color="#55A868" if r["fits"] else "#C44E52"
            )
    for value, label, style in ((limit_gb, "limit", "--"), (budget_gb, "budget", ":")):
        if value:
            ax_mem.axhline(value, color="grey", ls=style, lw=1, label=f"{label} {value:.2f} GiB")
    ax_mem.set_ylabel("peak memory (GiB)")
    ax_mem.legend(fontsize=8)
    fits = sorted((r["batch_size"], r["samples_per_s"]) for r in results if r["fits"] and r.get("samples_per_s"))
    if fits:
        ax_tp.plot([b for b, _ in fits], [v for _, v in fits], "o-", color="#4C72B0")
    ax_tp.set_ylabel("samples / s")
    sizes = sorted(r["batch_size"] for r in results)
    for ax in (ax_mem, ax_tp):
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.minorticks_off()
        ax.set_xlabel("micro-batch size")
        ax.grid(alpha=0.3)
        if recommended:
            ax.axvline(recommended, color="#DD8452", lw=1.5, alpha=0.6)
    fig.suptitle(title + (f" — recommended batch {recommended}" if recommended else ""), fontsize=11)
    return save_png(fig, path)


def validation_png(
    label_distribution: dict[str, dict[str, int]],
    lengths: list[int],
    max_seq_length: int,
    path: str | Path,
    title: str = "Dataset validation",
) -> Path:
    """Share of each button per split, and the token-length histogram against --max_seq_length."""
    fig, (ax_lab, ax_len) = plt.subplots(1, 2, figsize=(11, 3.8))
    splits = list(label_distribution)
    buttons = list(next(iter(label_distribution.values()), {}))
    width = 0.8 / max(1, len(splits))
    for k, split in enumerate(splits):
        counts = label_distribution[split]
        total = max(1, sum(counts.values()))
        ax_lab.bar(
            [i + k * width for i in range(len(buttons))],
            [counts[b] / total for b in buttons],
            width,
            label=f"{split} (n={sum(counts.values())})",
        )
    ax_lab.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(buttons))], buttons)
    ax_lab.set_ylabel("share of samples")
    ax_lab.legend(fontsize=8)
    ax_lab.set_title("labels", fontsize=10)
    if lengths:
        ax_len.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#4C72B0")
    ax_len.axvline(max_seq_length, color="#C44E52", ls="--", label=f"--max_seq_length {max_seq_length}")
    ax_len.set_xlabel("tokens per sample (incl. image tokens)")
    ax_len.set_ylabel("samples")
    ax_len.legend(fontsize=8)
    ax_len.set_title("token budget", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def pipeline_accuracy_png(bars: list[tuple[str, float]], min_accuracy: float, name: str, path: str | Path) -> Path:
    """Horizontal bars: the accuracy of each model the pipeline evaluated, and the gate's line."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4c72b0")
    ax.axvline(min_accuracy, color="#c44e52", linestyle="--", label=f"--min_accuracy {min_accuracy:g}")
    for y, (_, acc) in enumerate(bars):
        ax.text(acc, y, f" {acc:.3f}", va="center")
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("button accuracy")
    ax.set_title(f"{name}: accuracy by stage")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


def dagger_rounds_png(series: dict[str, list[tuple[int, float | None, float | None]]], path: str | Path) -> Path:
    """Success rate and steps ratio per round, one line per chain (DAgger, equal-budget BC)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, points in series.items():
        rounds = [p[0] for p in points]
        left.plot(rounds, [p[1] for p in points], marker="o", label=name)
        right.plot(rounds, [p[2] if p[2] is not None else math.nan for p in points], marker="o", label=name)
    left.set(title="goals done (success rate)", xlabel="round", ylim=(0, 1.05))
    right.set(title="steps ratio (presses / expert's)", xlabel="round")
    for ax in (left, right):
        ax.set_xticks(sorted({p[0] for points in series.values() for p in points}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
