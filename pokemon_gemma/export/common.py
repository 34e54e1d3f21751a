"""What merge and the exports share: errors, output checks, package versions, tokenizer files, and
the fixed 4-frame samples every verification runs on."""

from __future__ import annotations

import json
import logging
import platform
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..dataset import QUESTION, Record, load_records, make_output
from ..progress import progress

log = logging.getLogger(__name__)

# Files a processor/tokenizer may need; merged and MLX folders get every one the source had.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)


# A quantised export must pick PyTorch's button on at least this share of the verification samples.
MIN_BUTTON_AGREEMENT = 0.9
# Below this many samples one disagreement moves agreement by more than 3 points: the gate says little.
RECOMMENDED_SAMPLES = 32


class ExportError(RuntimeError):
    """A merge/export that cannot run or did not verify; one line for people, and an exit code
    (2: the command line points at something unusable, 1: the work failed)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    names = (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "safetensors",
        "mlx",
        "mlx-vlm",
        "llama-cpp-python",
        "numpy",
    )
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """The output folder must not exist (or be empty) unless --overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path}: exists and is not a folder (choose another --output_path)", code=2)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(f"{path}: output folder exists (pass --overwrite to replace it)", code=2)
    return path


def check_source_folder(source: Path) -> dict:
    """A merged model folder with safetensors weights (its config returned); one-line usage errors."""
    if not (source / "config.json").is_file():
        if (source / "adapter_config.json").is_file():
            raise ExportError(f"{source}: is a LoRA adapter (merge it first: scripts/merge_qlora.py)", code=2)
        raise ExportError(f"{source}/config.json: missing (pass a merged model folder)", code=2)
    try:
        config = json.loads((source / "config.json").read_text())
    except ValueError as exc:
        raise ExportError(f"{source}/config.json: invalid JSON ({exc})", code=2) from None
    if not any(source.glob("*.safetensors")):
        raise ExportError(f"{source}: no *.safetensors weights (save the model with safe_serialization)", code=2)
    return config


def agreement_refusal(what: str, agreed: int, n: int, required: float, remedy: str, where: str) -> str:
    """The one-line refusal of an export whose buttons agree with PyTorch too rarely."""
    share = agreed / n if n else 0.0
    return (
        f"{what} failed verification: its buttons agree with PyTorch on {agreed}/{n} samples ({share:.1%}), "
        f"below the required {required:.0%} (try {remedy}, or --no-verify to publish it unverified; {where})"
    )


def warn_few_samples(n: int, what: str) -> None:
    if n < RECOMMENDED_SAMPLES:
        log.warning(
            "%s verification on %d samples: one disagreement moves agreement by %.0f points (use %d or more)",
            what,
            n,
            100 / max(n, 1),
            RECOMMENDED_SAMPLES,
        )


def check_free_disk(folder: str | Path, needed_bytes: int) -> None:
    """Raise when the file system holding `folder` has less than `needed_bytes` free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise ExportError(
            f"{folder}: not enough disk: need {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free (free space or choose another --output_path)"
        )


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def resolve_local_dir(model: str, token: str | None = None) -> Path | None:
    """A local folder for a model: the folder itself, or its snapshot in the Hugging Face cache."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, token=token))
    except Exception:  # not cached / not a hub id: some optional copies are skipped
        return None


def copy_tokenizer_files(source: Path | None, dest: Path, replace: bool = False) -> list[str]:
    """Copy the tokenizer/processor files `source` has and `dest` lacks (e.g. `tokenizer.model`);
    with `replace`, also those whose bytes differ (the source is the truth)."""
    copied = []
    if source is None:
        return copied
    for name in TOKENIZER_FILES:
        src, dst = source / name, dest / name
        if not src.is_file():
            continue
        if not dst.exists() or (replace and src.read_bytes() != dst.read_bytes()):
            shutil.copy2(src, dst)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- fixed samples
@dataclass
class VerifySample:
    record: Record
    frames: list[Image.Image]


def fixed_samples(n: int, seed: int = 0) -> list[VerifySample]:
    """`n` deterministic 4-frame samples: windows of procedural demo sessions with expert labels."""
    from ..demo import generate_session

    out: list[VerifySample] = []
    index = 0
    while len(out) < n:
        session = generate_session(seed, index)
        index += 1
        for end in range(3, len(session.turns), 3):
            window = session.turns[end - 3 : end + 1]
            turn = window[-1]
            record = Record(
                frames=[f"demo:{session.session_id}:{t.turn}" for t in window],
                context=f"Session goal: {session.goal}.",
                question=QUESTION,
                output=make_output(turn.button, turn.reasoning, turn.context_detected, turn.observations),
                metadata={"session_id": session.session_id, "turns": [t.turn for t in window]},
            )
            out.append(VerifySample(record, [Image.fromarray(t.frame) for t in window]))
            if len(out) == n:
                break
    return out


def samples_from_jsonl(path: str | Path, n: int) -> list[VerifySample]:
    """The first `n` records of a JSONL file, frames decoded."""
    from ..collate import FrameLoader

    loader = FrameLoader()
    records = load_records(path)[:n]
    return [VerifySample(r, [loader.load(p) for p in r.frames]) for r in records]


def load_samples(verify_data: str | None, n: int) -> tuple[list[VerifySample], str]:
    """`n` verification samples: the first records of `verify_data`, topped up with fixed demo
    samples when it has fewer (a gate on 3 samples says nothing), or only fixed demo samples."""
    fixed_source = "fixed demo samples (pokemon_gemma.demo, seed 0)"
    if verify_data:
        from ..collate import SampleError
        from ..dataset import JsonlError, RecordError

        try:
            samples = samples_from_jsonl(verify_data, n)
        except (RecordError, JsonlError, SampleError) as exc:
            raise ExportError(str(exc), code=2) from None
        if len(samples) >= n:
            return samples, str(verify_data)
        extra = n - len(samples)
        log.info("%s has %d records: adding %d fixed demo samples to verify on %d", verify_data, len(samples), extra, n)
        return samples + fixed_samples(extra), f"{len(samples)} records of {verify_data} + {extra} {fixed_source}"
    return fixed_samples(n), fixed_source


def torch_logits(model, collator, sample: VerifySample, token_type_ids: bool = True):
    """Float32 logits (T, vocab) of the full sample (prompt + answer); with or without token_type_ids
    (without them transformers attends causally inside images, as MLX does)."""
    import torch

    enc = collator.encode(sample.record, with_answer=True, images=sample.frames)
    param = next(p for p in model.parameters() if p.is_floating_point())
    ids = enc.input_ids[None].to(param.device)
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc.pixel_values.to(param.device, param.dtype)
    )
    for key, value in (enc.pixel_extras or {}).items():  # Gemma 4: image_position_ids
        kwargs[key] = value.to(param.device)
    if token_type_ids:  # under the family's key (Gemma 4: mm_token_type_ids)
        kwargs[collator.family.token_type_key] = enc.token_type_ids[None].to(param.device)
    with torch.no_grad():
        return model(**kwargs).logits[0].float().cpu(), enc


def verify_progress(items: list, desc: str) -> Iterable:
    return progress(items, desc=desc, unit="sample", leave=False, disable=not items)
