"""Pre-training checks: everything that can be wrong before GPU time is spent.

Data (every split file: train, and val/test when they exist): each JSONL line parses and is a valid
record (exactly 4 frames, an `output` with a valid button), every frame exists and decodes, label
distribution, duplicate windows, no session in two splits. Tokens, with the real processor through
the training collator: per-sample length including every image soft token, max/p95 against
--max_seq_length, and an error naming each sample whose image tokens or answer would be truncated.
Environment: torch/CUDA/MPS, bf16, bitsandbytes, free disk, a rough GPU-memory estimate from the
model's parameter count, and whether a gated model id has a token (presence only, never the value).

Every finding is an Issue; any error makes the run fail (exit 1), warnings do not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import Settings
from .dataset import BUTTONS, MAX_FRAME_PIXELS, Record, RecordError, record_from_dict
from .progress import progress

GIB = 2**30
SPLITS = ("train", "val", "test")
MAX_SHOWN = 20  # printed per check; the JSON report has all

# Shapes of the gated hub models, used when their config is not available offline.
KNOWN_MODELS = {
    "google/gemma-3-4b-it": dict(
        params=4.30e9, hidden=2560, intermediate=10240, layers=34, heads=8, kv_heads=4, head_dim=256, vocab=262208
    ),
    "google/gemma-3-12b-it": dict(
        params=12.19e9, hidden=3840, intermediate=15360, layers=48, heads=16, kv_heads=8, head_dim=256, vocab=262208
    ),
    "google/gemma-3-27b-it": dict(
        params=27.43e9, hidden=5376, intermediate=21504, layers=62, heads=32, kv_heads=16, head_dim=128, vocab=262208
    ),
}


@dataclass
class Issue:
    level: str  # "error" | "warning"
    check: str
    where: str
    message: str
    fix: str = ""

    def line(self) -> str:
        where = f"{self.where}: " if self.where else ""
        return f"{self.level}: {where}{self.message}" + (f" ({self.fix})" if self.fix else "")


@dataclass
class Report:
    checks: dict[str, str] = field(default_factory=dict)  # name -> one-line summary
    issues: list[Issue] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    token_lengths: list[int] = field(default_factory=list)  # for the PNG, not the JSON

    def error(self, check, where, message, fix=""):
        self.issues.append(Issue("error", check, where, message, fix))

    def warn(self, check, where, message, fix=""):
        self.issues.append(Issue("warning", check, where, message, fix))

    def status(self, check: str) -> str:
        levels = {i.level for i in self.issues if i.check == check}
        return "error" if "error" in levels else "warning" if "warning" in levels else "ok"

    @property
    def ok(self) -> bool:
        return not any(i.level == "error" for i in self.issues)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "errors": sum(i.level == "error" for i in self.issues),
            "warnings": sum(i.level == "warning" for i in self.issues),
            "checks": {name: {"status": self.status(name), "summary": s} for name, s in self.checks.items()},
            "issues": [asdict(i) for i in self.issues],
            **self.data,
        }


@dataclass
class Row:
    split: str
    where: str  # file:line
    record: Record


# --------------------------------------------------------------------------- splits and records
def split_files(
    dataset_path: str, eval_path: str | None = None, test_path: str | None = None, split_dir: str | None = None
) -> dict[str, Path]:
    """train = --dataset_path (or SPLIT_DIR/train.jsonl); val/test = the flags, else the sibling
    val.jsonl/test.jsonl beside the training file when they exist."""
    if split_dir:
        base = Path(split_dir)
        return {name: base / f"{name}.jsonl" for name in SPLITS if name == "train" or (base / f"{name}.jsonl").exists()}
    train = Path(dataset_path)
    files = {"train": train}
    for name, given in (("val", eval_path), ("test", test_path)):
        if given:
            files[name] = Path(given)
        elif (train.parent / f"{name}.jsonl").exists() and train.name != f"{name}.jsonl":
            files[name] = train.parent / f"{name}.jsonl"
    return files


def read_split(name: str, path: Path, report: Report) -> list[Row]:
    """Every line of a split; a bad line is an error naming file:line and reading continues."""
    if not path.is_file():
        report.error("records", str(path), "file not found", f"check --{'dataset_path' if name == 'train' else name}")
        return []
    rows, bad_lines = [], 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.error("records", where, f"invalid JSON ({exc.msg})", "fix or remove the line")
                bad_lines += 1
                continue
            if not isinstance(obj, dict):
                report.error("records", where, f"expected a JSON object, got {type(obj).__name__}")
                bad_lines += 1
                continue
            try:
                rows.append(Row(name, where, record_from_dict(obj, where, path.parent)))
            except RecordError as exc:
                report.error("records", "", str(exc), "re-run the converter or fix the record")
                bad_lines += 1
    if not rows and not bad_lines:
        report.error("records", str(path), "no records", "convert data first")
    return rows


def check_frames(rows: list[Row], report: Report) -> set[str]:
    """Each distinct frame is opened and decoded once; returns the paths that failed."""
    from PIL import Image

    from .collate import declared_size

    users: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        for frame in row.record.frames:
            users[frame].append(row)
    bad, sizes = set(), Counter()
    for frame in progress(users, desc="decoding frames", unit="frame", leave=False):
        first = users[frame][0].where
        if not Path(frame).is_file():
            report.error(
                "frames",
                first,
                f"frame not found: {frame}",
                f"used by {len(users[frame])} sample(s); restore it or re-convert",
            )
            bad.add(frame)
            continue
        size = declared_size(frame)  # from the header, before decoding: a decompression bomb is never decoded
        if size is not None and size[0] * size[1] > MAX_FRAME_PIXELS:
            report.error(
                "frames",
                first,
                f"frame too large: {frame} declares {size[0]}x{size[1]} pixels (max {MAX_FRAME_PIXELS})",
                "delete it or re-convert (the converter skips such frames)",
            )
            bad.add(frame)
            continue
        try:
            with Image.open(frame) as im:
                im.load()
                sizes[f"{im.width}x{im.height}"] += 1
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            report.error("frames", first, f"frame does not decode: {frame} ({exc})", "replace the PNG or re-convert")
            bad.add(frame)
    if len(sizes) > 1:
        report.warn(
            "frames",
            "",
            f"frames have {len(sizes)} different sizes: {dict(sizes.most_common(5))}",
            "fine for the processor, but check the recordings",
        )
    report.checks["frames"] = (
        f"{len(users)} distinct frames, {len(users) - len(bad)} decode; sizes {dict(sizes.most_common(3))}"
    )
    report.data["frames"] = {"distinct": len(users), "bad": len(bad), "sizes": dict(sizes)}
    return bad


def check_labels(by_split: dict[str, list[Row]], report: Report) -> None:
    dist = {}
    for name, rows in by_split.items():
        counts = Counter(r.record.button for r in rows)
        dist[name] = {b: counts.get(b, 0) for b in BUTTONS}
        if rows:
            top, n = counts.most_common(1)[0]
            if n / len(rows) > 0.5 and len(rows) >= 10:
                report.warn(
                    "labels",
                    name,
                    f"'{top}' is {n / len(rows):.0%} of the samples (a constant answer already scores that much)",
                    "consider rebalancing",
                )
    train = set(b for b, n in dist.get("train", {}).items() if n)
    for name in ("val", "test"):
        unseen = [b for b, n in dist.get(name, {}).items() if n and b not in train]
        if unseen:
            report.warn("labels", name, f"buttons never seen in train: {', '.join(unseen)}")
    report.checks["labels"] = "; ".join(
        f"{name}: " + ", ".join(f"{b} {n}" for b, n in counts.items() if n) for name, counts in dist.items()
    )
    report.data["label_distribution"] = dist


def check_duplicates(rows: list[Row], report: Report) -> None:
    """The same window (same frames, or same session + turns) twice, in one split or across splits."""
    seen: dict[tuple, Row] = {}
    dups = 0
    for row in rows:
        r = row.record
        keys = [("frames", tuple(str(Path(f).resolve()) for f in r.frames))]
        if r.metadata.get("session_id") is not None and r.metadata.get("turns"):
            keys.append(("window", r.sample_id))
        for key in keys:
            if key in seen:
                first = seen[key]
                what = "same frames" if key[0] == "frames" else f"same window {r.sample_id}"
                report.error(
                    "duplicates",
                    row.where,
                    f"duplicate window ({what} as {first.where})",
                    "remove one of them; the converter de-duplicates",
                )
                dups += 1
                break
            seen[key] = row
    report.checks["duplicates"] = f"{dups} duplicate window(s) in {len(rows)} samples"


def check_sessions(by_split: dict[str, list[Row]], report: Report) -> None:
    sessions = {name: {r.record.metadata.get("session_id") for r in rows} - {None} for name, rows in by_split.items()}
    missing = sum(r.record.metadata.get("session_id") is None for rows in by_split.values() for r in rows)
    if missing:
        report.warn("sessions", "", f"{missing} samples have no metadata.session_id: their overlap cannot be checked")
    names = [n for n in SPLITS if n in sessions]
    overlaps = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sorted(sessions[a] & sessions[b])
            if common:
                overlaps[f"{a}/{b}"] = common
                shown = ", ".join(map(str, common[:5])) + (f" and {len(common) - 5} more" if len(common) > 5 else "")
                report.error(
                    "sessions",
                    f"{a}/{b}",
                    f"{len(common)} session(s) in both splits: {shown}",
                    "split by session id (convert_eevee_data_v2.py does) so validation is not leaked",
                )
    if len(names) < 2:
        summary = "only one split: no overlap to check"
    else:
        summary = (
            ", ".join(f"{n} {len(sessions[n])}" for n in names) + f" sessions; {len(overlaps)} overlapping pair(s)"
        )
    report.checks["sessions"] = summary
    report.data["sessions"] = {"per_split": {n: len(s) for n, s in sessions.items()}, "overlaps": overlaps}


# --------------------------------------------------------------------------- tokens
def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def check_tokens(rows: list[Row], bad_frames: set[str], s: Settings, report: Report, encode_samples: int = 8) -> dict:
    """Lengths with the real processor; over-long samples and the longest ones are fully encoded by
    the training collator, which raises SampleError when images or answer would be truncated."""

    from .collate import Collator, SampleError
    from .modeling import ModelLoadError, load_processor

    try:
        processor = load_processor(s.model_name, token=s.hub_token, image_tokens=s.image_tokens)
    except ModelLoadError as exc:
        report.error("tokens", "model", str(exc), "pass a loadable --model_name to check the token budget")
        report.checks["tokens"] = "not checked: processor not loadable"
        return {}
    collator = Collator(processor, s.max_seq_length, s.frame_layout)
    lengths = [
        (collator.sample_length(row.record), row)
        for row in progress(rows, desc="counting tokens", unit="sample", leave=False)
    ]
    if not lengths:
        report.checks["tokens"] = "no valid samples"
        return {}
    longest_first = sorted(lengths, key=lambda t: -t[0])
    to_encode = [t for t in longest_first if t[0] > s.max_seq_length] + longest_first[:encode_samples]
    shortened, rejected, done = 0, 0, set()
    for _length, row in to_encode:
        if id(row) in done or any(f in bad_frames for f in row.record.frames):
            continue
        done.add(id(row))
        try:
            sample = collator.encode(row.record)
        except SampleError as exc:
            rejected += 1
            report.error("tokens", row.where, str(exc), "")
            continue
        shortened += sample.context_shortened
    values = [n for n, _ in lengths]
    report.token_lengths = values
    # What the longest sample's images get (Gemma 4: by image size, up to the budget per image).
    longest_sizes = collator.record_sizes(longest_first[0][1].record)
    stats = {
        "tokens_per_image": collator.tokens_per_image,
        "images_per_sample": collator.n_images,
        "image_tokens_per_sample": sum(collator.image_counts(longest_sizes, collator.n_images)),
        "max": max(values),
        "p95": percentile(values, 0.95),
        "mean": sum(values) / len(values),
        "max_seq_length": s.max_seq_length,
        "over_limit": sum(v > s.max_seq_length for v in values),
        "context_shortened": shortened,
        "rejected": rejected,
    }
    if stats["p95"] > s.max_seq_length:
        report.warn(
            "tokens",
            "",
            f"p95 length {stats['p95']} > --max_seq_length {s.max_seq_length}: most long samples lose context text",
            "raise --max_seq_length or use --frame_layout grid",
        )
    elif shortened:
        report.warn("tokens", "", f"{shortened} sample(s) will have their context shortened to fit {s.max_seq_length}")
    report.checks["tokens"] = (
        f"max {stats['max']}, p95 {stats['p95']}, mean {stats['mean']:.0f} tokens "
        f"({stats['image_tokens_per_sample']} image tokens) vs --max_seq_length "
        f"{s.max_seq_length}; {stats['over_limit']} over, {rejected} rejected"
    )
    report.data["tokens"] = stats
    return stats


# --------------------------------------------------------------------------- model and environment
def model_shape(model_name: str, token: str | None = None) -> dict | None:
    """Parameter count and text-model shape: from the config (meta device, no weights), else the table."""
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(model_name, **({"token": token} if token else {}))
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        t = config.text_config
        return dict(
            params=sum(p.numel() for p in model.parameters()),
            hidden=t.hidden_size,
            intermediate=t.intermediate_size,
            layers=t.num_hidden_layers,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            vocab=t.vocab_size,
            source="config",
        )
    except Exception:  # noqa: BLE001 - offline hub id, unknown folder: fall back to the table
        known = KNOWN_MODELS.get(model_name)
        return {**known, "source": "table"} if known else None


def estimate_memory_gb(shape: dict, s: Settings, seq_len: int, answer_tokens: int = 64) -> dict:
    """Rough training memory per GPU: weights + grads + AdamW state + activations + answer logits."""
    h, inter, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    attn_out = shape["heads"] * shape["head_dim"]
    kv_out = shape["kv_heads"] * shape["head_dim"]
    linear = layers * (h * attn_out * 2 + h * kv_out * 2 + 3 * h * inter)  # text projections
    if s.use_qlora:
        weights = 0.55 * linear + 2 * (shape["params"] - linear)  # nf4 + double-quant scales, rest bf16
    else:
        weights = (2 if s.mixed_precision == "bf16" else 4) * shape["params"]
    if s.use_peft or s.use_qlora:
        per_layer = (h + attn_out) * 2 + (h + kv_out) * 2 + 3 * (h + inter)
        trainable = s.lora_r * layers * per_layer
    else:
        trainable = shape["params"]
    grads, optim = 4 * trainable, 8 * trainable
    act_bytes = 2 if s.mixed_precision in ("bf16", "fp16") or s.use_qlora else 4
    per_token_layer = 2 if s.gradient_checkpointing else 17  # x bytes x hidden; ~34 B/elem in 16-bit
    activations = s.batch_size * seq_len * h * layers * per_token_layer * act_bytes
    logits = s.batch_size * answer_tokens * shape["vocab"] * 4 * 2  # fp32 logits + their gradient
    total = (weights + grads + optim + activations + logits) * 1.15  # CUDA context, fragmentation
    return {
        k: v / GIB
        for k, v in dict(
            weights=weights, grads=grads, optimizer=optim, activations=activations, logits=logits, total=total
        ).items()
    } | {"trainable_params": trainable}


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def gpu_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            device_count=torch.cuda.device_count(),
            memory_gb=props.total_memory / GIB,
            bf16=torch.cuda.is_bf16_supported(),
        )
    elif info["mps"]:
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            bf16 = True
        except (RuntimeError, TypeError):
            bf16 = False
        info.update(device="mps", memory_gb=torch.mps.recommended_max_memory() / GIB, bf16=bf16)
    else:
        info.update(device="cpu", memory_gb=None, bf16=True)
    return info


def is_gated(model_name: str) -> bool:
    return model_name.startswith("google/") and not Path(model_name).exists()


def check_environment(s: Settings, stats: dict, report: Report) -> None:
    info = gpu_info()
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            info["bitsandbytes"] = version("bitsandbytes")
        except PackageNotFoundError:
            info["bitsandbytes"] = "unknown version"
    else:
        info["bitsandbytes"] = None
    if s.use_qlora and info["bitsandbytes"] is None:
        report.error(
            "environment",
            "bitsandbytes",
            "--use_qlora needs bitsandbytes, which is not installed",
            "pip install bitsandbytes (see requirements.txt) or drop --use_qlora",
        )
    if s.use_qlora and not info["cuda"]:
        report.warn("environment", "bitsandbytes", "QLoRA without CUDA runs 4-bit kernels on the CPU (very slow)")
    if s.mixed_precision == "bf16" and not info["bf16"]:
        report.error(
            "environment",
            info["device"],
            "--mixed_precision bf16 is not supported on this GPU",
            "use --mixed_precision fp16 or no",
        )
    if not info["cuda"] and not info["mps"]:
        report.warn(
            "environment", "device", "no CUDA or MPS device: training runs on the CPU (fine for the tiny model)"
        )
    report.checks["environment"] = (
        f"torch {info['torch']}, {info['device']}"
        + (f" {info['memory_gb']:.1f} GiB" if info.get("memory_gb") else "")
        + f", bf16 {'yes' if info['bf16'] else 'no'}, bitsandbytes "
        + (info["bitsandbytes"] or "missing")
    )

    # Model access: presence of a token only; its value never leaves the settings object.
    token_set = bool(s.hub_token)
    info["gated_model"], info["hub_token"] = is_gated(s.model_name), "set" if token_set else "not set"
    if info["gated_model"] and not token_set:
        report.error(
            "model access",
            s.model_name,
            "gated model id and no HUGGINGFACE_TOKEN",
            "accept the licence on huggingface.co and put HUGGINGFACE_TOKEN=... in .env",
        )
    access = (
        "local or public, no token needed"
        if not info["gated_model"]
        else "gated, token set (not shown)"
        if token_set
        else "gated, no token"
    )
    report.checks["model access"] = f"{s.model_name}: {access}"

    # Memory estimate and disk.
    shape = model_shape(s.model_name, s.hub_token)
    seq_len = min(stats.get("max", s.max_seq_length), s.max_seq_length)
    if shape is None:
        report.warn("memory estimate", s.model_name, "unknown model shape: no memory estimate")
        report.checks["memory estimate"] = "unknown model"
    else:
        est = estimate_memory_gb(shape, s, seq_len)
        info["memory_estimate_gb"] = est
        info["params"] = shape["params"]
        mode = "QLoRA" if s.use_qlora else "LoRA" if s.use_peft else "full fine-tuning"
        report.checks["memory estimate"] = (
            f"~{est['total']:.1f} GiB for {_count(shape['params'])} params, {mode}, "
            f"batch {s.batch_size} x {seq_len} tokens (rough: measure with "
            "find_batch_size.py)"
        )
        if info.get("memory_gb") and est["total"] > info["memory_gb"]:
            report.warn(
                "memory estimate",
                info["device"],
                f"estimate {est['total']:.1f} GiB > device {info['memory_gb']:.1f} GiB",
                "use --use_qlora, --gradient_checkpointing, a smaller --batch_size or --frame_layout grid",
            )
    out = Path(s.output_dir).resolve()
    probe = next((p for p in [out, *out.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / GIB
    need = 1.0 + (2 * 2 * shape["params"] / GIB if shape else 0)  # bf16 merged copy + export, plus checkpoints
    info["free_disk_gb"], info["disk_needed_gb"] = free, need
    if free < need:
        report.warn(
            "disk",
            str(probe),
            f"{free:.1f} GiB free, about {need:.1f} GiB needed for checkpoints, the merged model and its export",
            "free disk space or change --output_dir",
        )
    report.checks["disk"] = f"{free:.1f} GiB free at {probe} (about {need:.1f} GiB needed)"
    report.data["environment"] = info


# --------------------------------------------------------------------------- driver
def validate(s: Settings, files: dict[str, Path], encode_samples: int = 8) -> Report:
    from .distributed import precision_for

    report = Report()
    try:  # the training loop's own resolution: CLI > environment > .env > accelerate config > device default
        precision, source = precision_for(s.mixed_precision)
        s = dataclasses.replace(s, mixed_precision=precision)
        report.data["precision"] = {"mixed_precision": precision, "from": source}
    except ValueError as exc:
        report.error("environment", "MIXED_PRECISION", str(exc), "use no, bf16 or fp16")
        s = dataclasses.replace(s, mixed_precision="no")
    by_split = {name: read_split(name, path, report) for name, path in files.items()}
    rows = [r for split_rows in by_split.values() for r in split_rows]
    report.checks["records"] = ", ".join(f"{n}: {len(r)} valid" for n, r in by_split.items())
    report.data["splits"] = {n: {"path": str(files[n]), "valid_records": len(r)} for n, r in by_split.items()}
    bad_frames = check_frames(rows, report)
    check_labels(by_split, report)
    check_duplicates(rows, report)
    check_sessions(by_split, report)
    stats = check_tokens(rows, bad_frames, s, report, encode_samples) if rows else {}
    check_environment(s, stats, report)
    report.data["settings"] = {
        k: getattr(s, k)
        for k in (
            "model_name",
            "max_seq_length",
            "frame_layout",
            "image_tokens",
            "batch_size",
            "use_peft",
            "use_qlora",
            "gradient_checkpointing",
            "mixed_precision",
        )
    }
    return report


def print_report(report: Report, console=None, err_console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    colours = {"ok": "green", "warning": "yellow", "error": "red"}
    table = Table(title="pre-training validation")
    table.add_column("check")
    table.add_column("status")
    table.add_column("summary")
    for name, summary in report.checks.items():
        st = report.status(name)
        table.add_row(name, f"[{colours[st]}]{st}[/]", escape(summary))
    console.print(table)
    err_console = err_console or Console(stderr=True, soft_wrap=True, highlight=False)
    shown = Counter()
    for issue in sorted(report.issues, key=lambda i: i.level != "error"):
        shown[(issue.check, issue.level)] += 1
        if shown[(issue.check, issue.level)] <= MAX_SHOWN:
            err_console.print(escape(issue.line()))
    for (check, level), n in shown.items():
        if n > MAX_SHOWN:
            err_console.print(f"{level}: {check}: {n - MAX_SHOWN} more in the JSON report")
