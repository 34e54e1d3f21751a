"""Evaluation: button accuracy of a model against simple baselines, as JSON, Markdown and PNGs.

A model is reached through a small backend interface, so the torch scorer (base model, LoRA adapter,
merged folder) and an MLX export plug in the same way:

    backend.score(frames, context, question) -> ButtonScores      (mode "score")
    backend.generate(frames, context, question, max_new_tokens) -> str   (mode "generate")

`frames` are the 4 decoded PIL frames of a record. In score mode the prediction is the most likely of
the 8 full answers; in generate mode it is the `button` of the greedy JSON answer, and an answer that
is not JSON, or names no valid button, counts as wrong (and is counted by kind).

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .dataset import BUTTONS, Record, load_records
from .export import EXPORT_MANIFEST as MLX_MANIFEST
from .export import MERGE_MANIFEST
from .fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

MODES = ("score", "generate")
BACKENDS = ("auto", "torch", "mlx")
INVALID = "invalid"  # the predicted column for generate-mode answers without a valid button
REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"
PREDICTIONS = "predictions.jsonl"
CONFUSION_PNG = "confusion_matrix.png"
CONTEXT_PNG = "accuracy_by_context.png"


class EvalError(RuntimeError):
    """Evaluation cannot run (bad input or model); the message is one line for people."""


# --------------------------------------------------------------------------- backends
class Backend(Protocol):
    kind: str  # "base", "adapter", "merged", "finetuned" (full fine-tuning run) or "mlx"

    def score(self, frames: list, context: str, question: str): ...

    def generate(self, frames: list, context: str, question: str, max_new_tokens: int = 96) -> str: ...


class TorchBackend:
    """The shared `ButtonScorer` over a transformers model (optionally with a LoRA adapter)."""

    def __init__(
        self,
        model,
        processor,
        *,
        kind: str,
        max_seq_length: int = 2048,
        frame_layout: str = "images",
        blank_frames: bool = False,
        base_model: str | None = None,
        adapter_path: str | None = None,
    ):
        from .collate import Collator
        from .scoring import ButtonScorer

        self.kind = kind
        self.base_model, self.adapter_path = base_model, adapter_path  # as resolved (an adapter names its base)
        self.collator = Collator(processor, max_seq_length, frame_layout, blank_frames=blank_frames)
        self.scorer = ButtonScorer(model, self.collator)

    def score(self, frames, context, question):
        return self.scorer.score(frames, context, question)

    def generate(self, frames, context, question, max_new_tokens: int = 96) -> str:
        return self.scorer.generate(frames, context, question, max_new_tokens=max_new_tokens)

    def generate_batch(self, items, max_new_tokens: int = 96) -> list[str]:
        return self.scorer.generate_batch(items, max_new_tokens=max_new_tokens)


class MlxBackend:
    """Adapts the MLX export's scorer (`pokemon_gemma.mlx_backend.MlxButtonScorer`) to `Backend`."""

    kind = "mlx"

    def __init__(self, scorer, *, blank_frames: bool = False):
        self.scorer = scorer
        self.blank_frames = blank_frames

    def _frames(self, frames):
        if not self.blank_frames:
            return frames
        from .collate import blank_like

        return [blank_like(f) for f in frames]

    def score(self, frames, context, question):
        from .scoring import ButtonScores

        out = self.scorer.score(self._frames(frames), context, question)
        return out if hasattr(out, "logprobs") else ButtonScores(dict(out))

    def generate(self, frames, context, question, max_new_tokens: int = 96) -> str:
        if not hasattr(self.scorer, "generate"):
            raise EvalError("the MLX scorer has no generate(); use --mode score")
        return self.scorer.generate(self._frames(frames), context, question, max_new_tokens=max_new_tokens)


def is_mlx_export(path: str | Path) -> bool:
    return (Path(path) / MLX_MANIFEST).is_file()


def model_kind(model_name: str, adapter_path: str | None, backend: str = "auto") -> str:
    """base | adapter | merged | finetuned | mlx, from the flags and the folder's contents."""
    from .modeling import is_adapter_dir

    if backend == "mlx" or (backend == "auto" and is_mlx_export(model_name)):
        return "mlx"
    if adapter_path or is_adapter_dir(model_name):
        return "adapter"
    folder = Path(model_name)
    # A merge writes a manifest beside the weights; a full fine-tuning run its run_config.json.
    if (folder / MERGE_MANIFEST).is_file():
        return "merged"
    if (folder / "run_config.json").is_file():
        return "finetuned"
    return "base"


def load_backend(
    model_name: str,
    adapter_path: str | None = None,
    *,
    backend: str = "auto",
    frame_layout: str = "images",
    blank_frames: bool = False,
    max_seq_length: int = 2048,
    precision: str = "no",
    token: str | None = None,
) -> Backend:
    """Load any of the four model kinds; raise EvalError (one line) when it cannot be loaded."""
    from .modeling import ModelLoadError, adapter_base_model, is_adapter_dir, load_for_inference

    kind = model_kind(model_name, adapter_path, backend)
    if kind == "mlx":
        if adapter_path:
            raise EvalError("--adapter_path cannot be combined with an MLX export (merge the adapter first)")
        try:
            from .mlx_backend import MlxButtonScorer

            scorer = MlxButtonScorer(model_name, frame_layout=frame_layout, max_seq_length=max_seq_length)
        except ImportError as exc:
            raise EvalError(
                f"the MLX backend is not available ({exc}); install mlx-vlm or use --backend torch"
            ) from None
        except (OSError, ValueError, RuntimeError, ModelLoadError) as exc:
            raise EvalError(f"cannot load MLX export {model_name}: {_first_line(exc)}") from None
        return MlxBackend(scorer, blank_frames=blank_frames)
    if not adapter_path and is_adapter_dir(model_name):
        try:
            adapter_path, model_name = model_name, adapter_base_model(model_name)
        except (OSError, ValueError, KeyError) as exc:
            raise EvalError(
                f"{model_name}/adapter_config.json: no readable base_model_name_or_path "
                f"({_first_line(exc)}; pass --model_name BASE --adapter_path {model_name})"
            ) from None
        log.info("%s is a LoRA adapter; loading its base model %s", adapter_path, model_name)
    try:
        model, processor = load_for_inference(model_name, adapter_path, precision=precision, token=token)
    except ModelLoadError as exc:
        raise EvalError(str(exc)) from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # e.g. an adapter that does not fit its base
        raise EvalError(f"cannot load {adapter_path or model_name}: {_first_line(exc)}") from None
    return TorchBackend(
        model,
        processor,
        kind=kind,
        max_seq_length=max_seq_length,
        frame_layout=frame_layout,
        blank_frames=blank_frames,
        base_model=model_name,
        adapter_path=adapter_path,
    )


def run_frame_layout(model_name: str, adapter_path: str | None) -> str | None:
    """The frame layout the model was trained with, when its folder records it (a training run's
    run_config.json, a merge's or an MLX export's manifest)."""
    for folder in (adapter_path, model_name):
        for name in ("run_config.json", MERGE_MANIFEST, MLX_MANIFEST):
            path = Path(folder) / name if folder else None
            if path is None or not path.is_file():
                continue
            try:
                layout = json.loads(path.read_text()).get("frame_layout")
            except (OSError, ValueError, AttributeError):
                continue
            if layout in ("images", "grid"):
                return layout
    return None


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
) -> tuple[list[Prediction], list[dict]]:
    """Run the backend over the records: (predictions, skipped [{index, sample_id, reason}]).

    Score mode takes one sample at a time (its 8 answers already share one prompt pass); generate mode
    sends `batch_size` samples per call when the backend has `generate_batch`, and a sample's latency
    is then its share of the batch's time."""
    from tqdm import tqdm

    from .collate import FrameLoader, SampleError

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    frames_of = frame_loader or FrameLoader()
    step = max(1, batch_size) if mode == "generate" and hasattr(backend, "generate_batch") else 1
    predictions, skipped = [], []
    with tqdm(total=len(records), desc=f"evaluate ({mode})", unit="sample", disable=not progress) as bar:
        for i in range(0, len(records), step):
            batch = []
            for index, record in enumerate(records[i : i + step], start=i):
                try:
                    batch.append((record, [frames_of.load(p) for p in record.frames]))
                except SampleError as exc:
                    skipped.append({"index": index, "sample_id": record.sample_id, "reason": str(exc)})
            if batch:
                predictions += _predict_batch(backend, batch, mode, max_new_tokens)
            bar.update(len(records[i : i + step]))
    return predictions, skipped


def _predict_batch(
    backend: Backend, batch: list[tuple[Record, list]], mode: str, max_new_tokens: int
) -> list[Prediction]:
    from .scoring import parse_generated

    start = time.perf_counter()
    if mode == "score":
        ((record, frames),) = batch
        scores = backend.score(frames, record.context, record.question)
        return [
            Prediction(
                record.sample_id,
                record.button,
                scores.button,
                scene_context(record),
                time.perf_counter() - start,
                probabilities=scores.probabilities,
            )
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
    frame_layout: str = "images"
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
        backend = load_backend(
            cfg.model_name,
            cfg.adapter_path,
            backend=cfg.backend,
            frame_layout=cfg.frame_layout,
            blank_frames=cfg.blank_frames,
            max_seq_length=cfg.max_seq_length,
            precision=cfg.precision,
            token=token,
        )
    from .collate import SampleError

    try:
        predictions, skipped = predict(
            backend, records, cfg.mode, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress
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
        "backend": "mlx" if getattr(backend, "kind", "") == "mlx" else "torch",
        "dataset_path": str(cfg.dataset_path),
        "train_dataset_path": cfg.train_dataset_path,
        "resolved_base_model": getattr(backend, "base_model", None),
        "resolved_adapter_path": getattr(backend, "adapter_path", None),
        "blank_frames": cfg.blank_frames,
        "frame_layout": cfg.frame_layout,
        "limit": cfg.limit,
        "batch_size": cfg.batch_size,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
