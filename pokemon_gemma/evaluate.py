"""Evaluation: button accuracy of a model against simple baselines, as JSON, Markdown and PNGs.

Any model folder is reached through `pokemon_gemma.backends` (torch for a base model, LoRA adapter,
merged folder or full fine-tune; MLX for an export), so every kind plugs in the same way. In score
mode the prediction is the most likely of the 8 full answers; in generate mode it is the `button` of
the greedy JSON answer, and an answer that is not JSON, or names no valid button, counts as wrong
(and is counted by kind).

Baselines are computed on exactly the evaluated samples: `majority` (the most common button of the
training split when given, else of this set), `repeat_last` (the previous turn's button,
`metadata.previous_buttons[-1]`; samples without it count as wrong) and `uniform_random` (1/8).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import Backend, BackendError, load_backend
from .dataset import BUTTONS, Record, load_records
from .fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text, now_iso
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

MODES = ("score", "generate")
INVALID = "invalid"  # the predicted column for generate-mode answers without a valid button
REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"
PREDICTIONS = "predictions.jsonl"
CONFUSION_PNG = "confusion_matrix.png"
CONTEXT_PNG = "accuracy_by_context.png"


class EvalError(RuntimeError):
    """Evaluation cannot run (bad input or model); the message is one line for people."""


# --------------------------------------------------------------------------- per-sample predictions
@dataclass
class Prediction:
    sample_id: str
    true: str
    predicted: str  # a button, or INVALID in generate mode
    context: str  # the scene context used for grouping
    latency_s: float
    probabilities: dict[str, float] | None = None
    raw_output: str | None = None
    error: str | None = None  # None | "invalid_json" | "invalid_button"

    @property
    def correct(self) -> bool:
        return self.predicted == self.true


def scene_context(record: Record) -> str:
    md = record.metadata
    value = md.get("scene_context") or md.get("context_detected") or md.get("context")
    return str(value) if value else "unknown"


def previous_button(record: Record) -> str | None:
    prev = record.metadata.get("previous_buttons")
    if isinstance(prev, list) and prev and isinstance(prev[-1], str):
        return prev[-1].strip().lower()
    return None


def predict(
    backend: Backend,
    records: list[Record],
    mode: str = "score",
    *,
    max_new_tokens: int = 96,
    batch_size: int = 1,
    progress: bool = True,
    frame_loader=None,
    blank_frames: bool = False,
) -> tuple[list[Prediction], list[dict]]:
    """Run the backend over the records: (predictions, skipped [{index, sample_id, reason}]).

    Both modes send `batch_size` samples per model call (score: `score_batch`, one prompt pass and one
    answer pass for the batch; generate: `generate_batch`), and a sample's latency is then its share of
    the batch's time. In score mode, batches are formed from samples of similar context length (less
    padding); predictions come back in the records' order either way. `blank_frames` replaces every
    frame by a black one of the same size (does the model read the pixels?)."""
    from .collate import FrameLoader, SampleError, blank_like

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    frames_of = frame_loader or FrameLoader()
    step = max(1, batch_size)
    order = list(range(len(records)))
    if mode == "score" and step > 1:
        order.sort(key=lambda i: len(records[i].context) + len(records[i].question))
    predicted: dict[int, Prediction] = {}
    skipped = []
    with progress_bar(total=len(records), desc=f"evaluate ({mode})", unit="sample", disable=not progress) as bar:
        for start in range(0, len(order), step):
            batch, indices = [], []
            for index in order[start : start + step]:
                record = records[index]
                try:
                    frames = [frames_of.load(p) for p in record.frames]
                except SampleError as exc:
                    skipped.append({"index": index, "sample_id": record.sample_id, "reason": str(exc)})
                    continue
                batch.append((record, [blank_like(f) for f in frames] if blank_frames else frames))
                indices.append(index)
            if batch:
                predicted.update(zip(indices, _predict_batch(backend, batch, mode, max_new_tokens)))
            bar.update(len(order[start : start + step]))
    return [predicted[i] for i in sorted(predicted)], sorted(skipped, key=lambda s: s["index"])


def _predict_batch(
    backend: Backend, batch: list[tuple[Record, list]], mode: str, max_new_tokens: int
) -> list[Prediction]:
    from .scoring import ScoreItem, parse_generated

    start = time.perf_counter()
    if mode == "score":
        scored = backend.score_batch([ScoreItem(frames, r.context, r.question) for r, frames in batch])
        latency = (time.perf_counter() - start) / len(batch)
        return [
            Prediction(
                record.sample_id,
                record.button,
                scores.button,
                scene_context(record),
                latency,
                probabilities=scores.probabilities,
            )
            for (record, _), scores in zip(batch, scored)
        ]
    items = [(frames, r.context, r.question) for r, frames in batch]
    if len(items) == 1:
        texts = [backend.generate(*items[0], max_new_tokens=max_new_tokens)]
    else:
        texts = backend.generate_batch(items, max_new_tokens=max_new_tokens)
    latency = (time.perf_counter() - start) / len(items)
    out = []
    for (record, _), text in zip(batch, texts):
        parsed, error = parse_generated(text)
        out.append(
            Prediction(
                record.sample_id,
                record.button,
                parsed["button"] if parsed else INVALID,
                scene_context(record),
                latency,
                raw_output=text,
                error=error,
            )
        )
    return out


# --------------------------------------------------------------------------- metrics
def confusion_matrix(
    true: list[str],
    predicted: list[str],
    labels: Iterable[str] = BUTTONS,
    predicted_labels: Iterable[str] | None = None,
) -> list[list[int]]:
    labels = list(labels)
    cols = list(predicted_labels) if predicted_labels is not None else labels
    matrix = [[0] * len(cols) for _ in labels]
    for t, p in zip(true, predicted):
        matrix[labels.index(t)][cols.index(p)] += 1
    return matrix


def per_button_metrics(true: list[str], predicted: list[str]) -> dict[str, dict[str, float | int | None]]:
    """Precision/recall/F1 per button; precision is None for a button never predicted (and so on)."""
    out = {}
    for b in BUTTONS:
        tp = sum(1 for t, p in zip(true, predicted) if t == b and p == b)
        n_pred = sum(1 for p in predicted if p == b)
        support = sum(1 for t in true if t == b)
        precision = tp / n_pred if n_pred else None
        recall = tp / support if support else None
        if support == 0 and n_pred == 0:
            f1 = None  # the button plays no part in this evaluation
        else:
            f1 = 2 * tp / (support + n_pred)  # = 2PR/(P+R), and 0 when either side is empty
        out[b] = {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": n_pred}
    return out


def macro_f1(per_button: dict[str, dict]) -> float:
    """Mean F1 over the buttons that occur as a label or a prediction (a missing side counts as 0)."""
    f1s = []
    for m in per_button.values():
        if m["support"] == 0 and m["predicted"] == 0:
            continue
        f1s.append(m["f1"])
    return sum(f1s) / len(f1s) if f1s else 0.0


def accuracy_by_context(predictions: list[Prediction]) -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[bool]] = {}
    for p in predictions:
        groups.setdefault(p.context, []).append(p.correct)
    return {
        ctx: {"n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)}
        for ctx, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p95": None}
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}


def majority_button(buttons: Iterable[str]) -> str:
    counts = Counter(buttons)
    # Ties break in BUTTONS order so the baseline is deterministic.
    return max(BUTTONS, key=lambda b: (counts[b], -BUTTONS.index(b)))


def compute_baselines(records: list[Record], train_records: list[Record] | None = None) -> dict[str, Any]:
    """Baseline accuracies on exactly these records."""
    n = len(records)
    true = [r.button for r in records]
    source = "train" if train_records else "eval"
    majority = majority_button(r.button for r in (train_records or records))
    previous = [previous_button(r) for r in records]
    missing = sum(1 for p in previous if p is None)
    return {
        "majority": {
            "button": majority,
            "source": source,
            "accuracy": sum(t == majority for t in true) / n if n else 0.0,
        },
        "repeat_last": {
            "accuracy": sum(p == t for p, t in zip(previous, true)) / n if n else 0.0,
            "n_missing_previous": missing,
            "note": "samples without metadata.previous_buttons count as wrong",
        },
        "uniform_random": {"accuracy": 1 / len(BUTTONS), "note": "expected accuracy of a uniform guess"},
    }


def build_report(
    predictions: list[Prediction],
    records: list[Record],
    *,
    mode: str,
    train_records: list[Record] | None = None,
    info: dict[str, Any] | None = None,
    skipped: list[dict] | None = None,
) -> dict[str, Any]:
    """The eval_report.json object: metrics over `predictions`, baselines over the same samples."""
    skipped_at = {s["index"] for s in skipped or []}
    same = [r for i, r in enumerate(records) if i not in skipped_at]  # baselines on the evaluated samples
    true = [p.true for p in predictions]
    pred = [p.predicted for p in predictions]
    n = len(predictions)
    per_button = per_button_metrics(true, pred)
    cols = list(BUTTONS) + ([INVALID] if mode == "generate" else [])
    report: dict[str, Any] = {
        **(info or {}),
        "mode": mode,
        "n": n,
        "n_skipped": len(skipped or []),
        "skipped": (skipped or [])[:20],
        "accuracy": sum(p.correct for p in predictions) / n if n else 0.0,
        "macro_f1": macro_f1(per_button),
        "per_button": per_button,
        "confusion_matrix": {
            "labels": list(BUTTONS),
            "predicted_labels": cols,
            "matrix": confusion_matrix(true, pred, BUTTONS, cols),
            "note": "rows are true buttons, columns predicted",
        },
        "accuracy_by_context": accuracy_by_context(predictions),
        "latency_s": latency_stats([p.latency_s for p in predictions]),
        "json_valid_rate": None,
        "invalid_json": None,
        "invalid_button": None,
        "mean_probability": None,
        "mean_true_probability": None,
        "baselines": compute_baselines(same, train_records),
    }
    if mode == "generate":
        report["invalid_json"] = sum(p.error == "invalid_json" for p in predictions)
        report["invalid_button"] = sum(p.error == "invalid_button" for p in predictions)
        report["json_valid_rate"] = sum(p.error is None for p in predictions) / n if n else 0.0
    elif n:
        report["mean_probability"] = {b: sum(p.probabilities[b] for p in predictions) / n for b in BUTTONS}
        report["mean_true_probability"] = sum(p.probabilities[p.true] for p in predictions) / n
    return report


# --------------------------------------------------------------------------- the whole stage
@dataclass
class EvalConfig:
    model_name: str
    dataset_path: str
    output_dir: str
    adapter_path: str | None = None
    mode: str = "score"
    limit: int | None = None
    blank_frames: bool = False
    train_dataset_path: str | None = None
    frame_layout: str | None = None  # None: what the model folder records, else default_frame_layout
    default_frame_layout: str = "images"
    backend: str = "auto"
    max_seq_length: int = 2048
    precision: str = "no"
    max_new_tokens: int = 96
    batch_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def load_eval_records(cfg: EvalConfig) -> tuple[list[Record], list[Record] | None]:
    """Test (limited) and train records; raise EvalError naming the file (and line) on bad input."""
    from .dataset import RecordError
    from .fileio import JsonlError

    try:
        records = load_records(cfg.dataset_path)
        train = load_records(cfg.train_dataset_path) if cfg.train_dataset_path else None
    except (RecordError, JsonlError) as exc:
        raise EvalError(str(exc)) from None
    if cfg.limit is not None and cfg.limit > 0:
        records = records[: cfg.limit]
    return records, train


def evaluate(
    cfg: EvalConfig, backend: Backend | None = None, *, progress: bool = True, token: str | None = None
) -> dict[str, Any]:
    """Evaluate and write eval_report.json/.md, predictions.jsonl and the PNGs into cfg.output_dir."""
    records, train = load_eval_records(cfg)
    if cfg.mode not in MODES:
        raise EvalError(f"--mode must be one of {', '.join(MODES)}")
    if backend is None:
        try:
            backend = load_backend(
                cfg.model_name,
                cfg.adapter_path,
                backend=cfg.backend,
                frame_layout=cfg.frame_layout,
                default_frame_layout=cfg.default_frame_layout,
                max_seq_length=cfg.max_seq_length,
                precision=cfg.precision,
                token=token,
            )
        except BackendError as exc:
            raise EvalError(str(exc)) from None
    from .collate import SampleError

    try:
        predictions, skipped = predict(
            backend,
            records,
            cfg.mode,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            progress=progress,
            blank_frames=cfg.blank_frames,
        )
    except SampleError as exc:  # the prompt does not fit this model/processor: systematic, not per sample
        raise EvalError(f"{cfg.dataset_path}: {exc}") from None
    if not predictions:
        raise EvalError(
            f"{cfg.dataset_path}: no sample could be evaluated ({len(skipped)} skipped: "
            f"{skipped[0]['reason'] if skipped else 'empty'})"
        )
    info = {
        "model_name": cfg.model_name,
        "adapter_path": cfg.adapter_path,
        "model_kind": getattr(backend, "kind", "?"),
        "backend": getattr(backend, "name", "?"),
        "dataset_path": str(cfg.dataset_path),
        "train_dataset_path": cfg.train_dataset_path,
        "resolved_base_model": getattr(backend, "base_model", None),
        "resolved_adapter_path": getattr(backend, "adapter_path", None),
        "blank_frames": cfg.blank_frames,
        "frame_layout": getattr(backend, "frame_layout", cfg.frame_layout),
        "limit": cfg.limit,
        "batch_size": cfg.batch_size,
        "created_at": now_iso(),
        **cfg.extra,
    }
    report = build_report(predictions, records, mode=cfg.mode, train_records=train, info=info, skipped=skipped)
    write_outputs(report, predictions, cfg.output_dir)
    return report


def write_outputs(report: dict[str, Any], predictions: list[Prediction], output_dir: str | Path) -> Path:
    from . import plots

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / PREDICTIONS, (_prediction_row(p) for p in predictions))
    cm = report["confusion_matrix"]
    title = _short_title(report)
    plots.confusion_matrix_png(
        cm["matrix"], cm["labels"], cm["predicted_labels"], out / CONFUSION_PNG, title=f"Confusion matrix — {title}"
    )
    plots.accuracy_by_context_png(
        report["accuracy_by_context"],
        out / CONTEXT_PNG,
        overall=report["accuracy"],
        baselines={k: v["accuracy"] for k, v in report["baselines"].items()},
        title=f"Accuracy by scene context — {title}",
    )
    atomic_write_text(out / REPORT_MD, markdown_report(report))
    atomic_write_json(out / REPORT_JSON, report)  # last: its presence means the folder is complete
    return out


def _prediction_row(p: Prediction) -> dict[str, Any]:
    row = {
        "sample_id": p.sample_id,
        "true": p.true,
        "predicted": p.predicted,
        "correct": p.correct,
        "context": p.context,
        "latency_s": round(p.latency_s, 6),
    }
    if p.probabilities is not None:
        row["probabilities"] = {b: round(v, 6) for b, v in p.probabilities.items()}
    if p.raw_output is not None:
        row["raw_output"], row["error"] = p.raw_output, p.error
    return row


def _short_title(report: dict[str, Any]) -> str:
    path = Path(report.get("adapter_path") or report.get("model_name") or "model")
    # A run's best/ or checkpoint-N/ says little alone: name its run too.
    name = (
        f"{path.parent.name}/{path.name}" if path.name == "best" or path.name.startswith("checkpoint-") else path.name
    )
    return f"{name} ({report['mode']}{', blank frames' if report.get('blank_frames') else ''})"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f} ms"


def markdown_report(report: dict[str, Any]) -> str:
    b = report["baselines"]
    lat = report["latency_s"]
    lines = [
        f"# Evaluation: {_short_title(report)}",
        "",
        f"- model: `{report.get('model_name')}`"
        + (f" + adapter `{report['adapter_path']}`" if report.get("adapter_path") else "")
        + f" ({report.get('model_kind')}, {report.get('backend')})",
        f"- data: `{report.get('dataset_path')}` — {report['n']} samples"
        + (f", {report['n_skipped']} skipped" if report.get("n_skipped") else ""),
        f"- mode: {report['mode']}; frames: {'blank (ablation)' if report.get('blank_frames') else 'real'}; "
        f"layout: {report.get('frame_layout')}",
        f"- latency per sample: mean {_ms(lat['mean'])}, p50 {_ms(lat['p50'])}, p95 {_ms(lat['p95'])}",
    ]
    if report["mode"] == "generate":
        lines.append(
            f"- valid JSON answers: {_fmt(report['json_valid_rate'])} "
            f"(invalid JSON {report['invalid_json']}, invalid button {report['invalid_button']})"
        )
    lines += [
        "",
        "| | accuracy |",
        "|---|---|",
        f"| **model** | **{_fmt(report['accuracy'])}** |",
        f"| majority ({b['majority']['button']}, from {b['majority']['source']}) | {_fmt(b['majority']['accuracy'])} |",
        f"| repeat last button ({b['repeat_last']['n_missing_previous']} without a previous turn) "
        f"| {_fmt(b['repeat_last']['accuracy'])} |",
        f"| uniform random | {_fmt(b['uniform_random']['accuracy'])} |",
        "",
        f"Macro F1: {_fmt(report['macro_f1'])}",
        "",
        "| button | precision | recall | F1 | support | predicted |"
        + (" mean prob |" if report["mean_probability"] else ""),
        "|---|---|---|---|---|---|" + ("---|" if report["mean_probability"] else ""),
    ]
    for button, m in report["per_button"].items():
        cells = [_fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), m["support"], m["predicted"]]
        row = f"| {button} | " + " | ".join(str(c) for c in cells) + " |"
        if report["mean_probability"]:
            row += f" {_fmt(report['mean_probability'][button])} |"
        lines.append(row)
    lines += ["", f"![confusion matrix]({CONFUSION_PNG})", "", f"![accuracy by context]({CONTEXT_PNG})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- comparing runs
COMPARE_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("accuracy", lambda r: _fmt(r.get("accuracy"))),
    ("macro_f1", lambda r: _fmt(r.get("macro_f1"))),
    ("n", lambda r: _fmt(r.get("n"))),
    ("mode", lambda r: r.get("mode", "?") + ("+blank" if r.get("blank_frames") else "")),
    ("kind", lambda r: str(r.get("model_kind", "?"))),
    ("json_valid", lambda r: _fmt(r.get("json_valid_rate"))),
    ("lat_mean_ms", lambda r: _fmt(None if r["latency_s"]["mean"] is None else r["latency_s"]["mean"] * 1000, 1)),
    ("lat_p95_ms", lambda r: _fmt(None if r["latency_s"]["p95"] is None else r["latency_s"]["p95"] * 1000, 1)),
    ("majority", lambda r: _fmt(r["baselines"]["majority"]["accuracy"])),
    ("repeat_last", lambda r: _fmt(r["baselines"]["repeat_last"]["accuracy"])),
    ("uniform", lambda r: _fmt(r["baselines"]["uniform_random"]["accuracy"])),
]


def load_report(eval_dir: str | Path) -> dict[str, Any]:
    path = Path(eval_dir) / REPORT_JSON
    if not path.is_file():
        raise EvalError(f"{path}: file not found (run scripts/evaluate.py --output_dir {eval_dir} first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EvalError(f"{path}: invalid JSON ({exc})") from None


def compare_table(eval_dirs: list[str | Path]) -> str:
    """One side-by-side text table: a row per eval folder, a column per metric."""
    reports = [load_report(d) for d in eval_dirs]
    header = ["eval_dir"] + [name for name, _ in COMPARE_COLUMNS]
    rows = [[str(d)] + [fn(r) for _, fn in COMPARE_COLUMNS] for d, r in zip(eval_dirs, reports)]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
