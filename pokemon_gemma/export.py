"""Merge a LoRA adapter into its base model, and export a merged Gemma 3 folder to MLX, both verified.

Merge: the base is loaded unquantised in float32 (a QLoRA adapter is never merged into 4-bit
weights), the adapter is merged with peft's `merge_and_unload`, and the result is saved in the
requested dtype with the processor, every tokenizer file the base had and `merge_manifest.json`.
Verification compares the merged model's logits with the unmerged adapter's on fixed 4-frame samples.

MLX export: mlx-vlm's converter (it keeps the vision tower; mlx-lm drops it) only converts a
transformers-5 Gemma 3 folder correctly after fixes to its config and weight names, several of
which fail silently (measured with mlx 0.32 / mlx-vlm 0.7.10 / transformers 5.23; see MLX_FIXES).
The fixes are applied to a copy, each only when needed, the converter runs offline in a subprocess,
and `export_manifest.json` records the fixes applied, the versions and the verification figures:
MLX float32 logits vs PyTorch without `token_type_ids` (both causal: must agree within 1e-3), and
the button chosen by the export vs PyTorch with and without `token_type_ids` on a fixed eval set.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dataset import QUESTION, Record, load_records, make_output
from .fileio import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

MERGE_MANIFEST = "merge_manifest.json"
EXPORT_MANIFEST = "export_manifest.json"
MERGE_DTYPES = ("bf16", "fp16", "fp32")
# Max |logit| difference merged vs adapter, relative to max(1, max |logit|): float32 only reorders
# sums; 16-bit dtypes round every weight once more (measured on the tiny model: fp32 8e-7,
# bf16 1.8e-2, fp16 2.6e-3 of the logit scale).
MERGE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
MLX_LOGIT_TOLERANCE = 1e-3
MIN_BUTTON_AGREEMENT = 0.9
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
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class ExportError(RuntimeError):
    """A merge/export that cannot run or did not verify; one line for people, and an exit code
    (2: the command line points at something unusable, 1: the work failed)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- small helpers
def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "mlx", "mlx-vlm", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """The output folder must not exist (or be empty) unless --overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path}: exists and is not a folder (choose another --output_path)", code=2)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(f"{path}: output folder exists (pass --overwrite to replace it)", code=2)
    return path


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


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _staging_dir(output: Path, tag: str) -> Path:
    """A scratch folder beside the output (same file system, so the final rename is atomic)."""
    staging = output.parent / f".{output.name}.{tag}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, output: Path) -> None:
    """Replace `output` by the finished staging folder."""
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)


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
    from .demo import generate_session

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
    from .collate import FrameLoader

    loader = FrameLoader()
    records = load_records(path)[:n]
    return [VerifySample(r, [loader.load(p) for p in r.frames]) for r in records]


def load_samples(verify_data: str | None, n: int) -> tuple[list[VerifySample], str]:
    if verify_data:
        from .collate import SampleError
        from .dataset import JsonlError, RecordError

        try:
            return samples_from_jsonl(verify_data, n), str(verify_data)
        except (RecordError, JsonlError, SampleError) as exc:
            raise ExportError(str(exc), code=2) from None
    return fixed_samples(n), "fixed demo samples (pokemon_gemma.demo, seed 0)"


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
    if token_type_ids:
        kwargs["token_type_ids"] = enc.token_type_ids[None].to(param.device)
    with torch.no_grad():
        return model(**kwargs).logits[0].float().cpu(), enc


# --------------------------------------------------------------------------- merge
def validate_adapter(lora_path: str | Path) -> Path:
    """The adapter weights file; one-line errors for a missing folder or files."""
    lora = Path(lora_path)
    if not lora.is_dir():
        raise ExportError(
            f"{lora}: adapter folder not found (pass the training run folder, its best/ or a checkpoint-N/)", code=2
        )
    if not (lora / "adapter_config.json").is_file():
        raise ExportError(
            f"{lora}/adapter_config.json: missing (not a LoRA adapter folder; pass the run folder, "
            "best/ or checkpoint-N/ that holds adapter_config.json)",
            code=2,
        )
    try:
        json.loads((lora / "adapter_config.json").read_text())
    except ValueError as exc:
        raise ExportError(f"{lora}/adapter_config.json: invalid JSON ({exc})", code=2) from None
    for name in ADAPTER_WEIGHTS:
        if (lora / name).is_file():
            return lora / name
    raise ExportError(
        f"{lora}/adapter_model.safetensors: missing (the adapter folder has no weights; "
        "re-save the adapter or pass another checkpoint)",
        code=2,
    )


def _load_adapter(model, lora_path: Path, base_model: str):
    """PeftModel over `model`; a clear error when the adapter does not fit the base."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        peft_model = PeftModel.from_pretrained(model, str(lora_path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)
        raise ExportError(
            f"adapter/base mismatch: {lora_path} does not fit {base_model} ({reason}; "
            "was the adapter trained on another model?)"
        ) from None
    # peft only warns when adapter tensors find no module; a merge would then silently do nothing.
    saved = set(load_peft_weights(str(lora_path), device="cpu"))
    loaded = set(get_peft_model_state_dict(peft_model))
    missing = sorted(saved - loaded)
    if missing:
        raise ExportError(
            f"adapter/base mismatch: {len(missing)} of {len(saved)} adapter tensors of {lora_path} "
            f"have no module in {base_model} (e.g. {missing[0]})"
        )
    return peft_model


def _adapter_summary(lora_path: Path, weights: Path) -> dict[str, Any]:
    cfg = json.loads((lora_path / "adapter_config.json").read_text())
    return {
        "path": str(lora_path.resolve()),
        "weights_file": weights.name,
        "sha256": file_sha256(weights),
        "config_sha256": file_sha256(lora_path / "adapter_config.json"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "target_modules": cfg.get("target_modules"),
    }


def _run_config_path(lora_path: Path) -> Path | None:
    """The training run's run_config.json: in the adapter folder or, for best/ and checkpoint-N/, its parent."""
    for candidate in (lora_path / "run_config.json", lora_path.parent / "run_config.json"):
        if candidate.is_file():
            return candidate
    return None


def _run_config(lora_path: Path) -> dict[str, Any]:
    path = _run_config_path(lora_path)
    try:
        return json.loads(path.read_text()) if path else {}
    except ValueError:
        return {}


def _frame_layout(lora_path: Path) -> str | None:
    layout = _run_config(lora_path).get("frame_layout")
    return layout if layout in ("images", "grid") else None


def merge_lora(
    base_model: str,
    lora_path: str | Path,
    output_path: str | Path,
    *,
    dtype: str = "bf16",
    verify: bool = True,
    overwrite: bool = False,
    n_samples: int = 3,
    verify_data: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Merge, save and (optionally) verify; returns the manifest. Raises ExportError; a verification
    failure still writes the folder and the manifest (with `verification.passed: false`)."""
    from transformers import AutoModelForImageTextToText

    from .collate import Collator
    from .modeling import DTYPES, ModelLoadError, load_model, load_processor

    if dtype not in MERGE_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}", code=2)
    lora = Path(lora_path)
    weights = validate_adapter(lora)
    output = check_output_dir(output_path, overwrite)
    base_dir = resolve_local_dir(base_model, token)
    bytes_per_param = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    if base_dir is not None and _weights_bytes(base_dir):
        # Checkpoints on the hub are bf16: the merged folder is about their size times this ratio.
        check_free_disk(output.parent, int(_weights_bytes(base_dir) * bytes_per_param / 2 * 1.05))

    # Bad verification data fails now, not after minutes of loading.
    samples, samples_source = load_samples(verify_data, n_samples) if verify else ([], None)
    started = time.time()
    log.info("loading %s in float32 (never merging into quantised weights)", base_model)
    try:
        model = load_model(base_model, precision="fp32", token=token)
        proc_source = str(lora) if (lora / "processor_config.json").is_file() else base_model
        processor = load_processor(proc_source, token=token)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    base_revision = getattr(model.config, "_commit_hash", None)
    model = _load_adapter(model, lora, base_model).eval()

    collator = Collator(processor, max_seq_length=8192, frame_layout=_frame_layout(lora) or "images")
    reference, effect = [], 0.0
    for sample in _progress(samples, "adapter logits"):
        reference.append(torch_logits(model, collator, sample)[0])
        with model.disable_adapter():  # how far the adapter moves the base: a merge must keep that
            effect = max(effect, float((torch_logits(model, collator, sample)[0] - reference[-1]).abs().max()))

    merged = model.merge_and_unload()
    merged.to(DTYPES[dtype])
    n_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    check_free_disk(output.parent, int(n_bytes * 1.05))
    staging = _staging_dir(output, "merge")
    try:
        merged.save_pretrained(staging)
        processor.save_pretrained(staging)
        copied = copy_tokenizer_files(base_dir, staging)
        run_config = _run_config_path(lora)
        if run_config:  # frame_layout etc. for the evaluator and server (secrets already masked by training)
            shutil.copy2(run_config, staging / "run_config.json")
        del model, merged

        verification: dict[str, Any] = {"ran": False}
        if verify:
            reloaded = AutoModelForImageTextToText.from_pretrained(staging, dtype=DTYPES[dtype]).eval()
            diffs, scale = [], 1.0
            for sample, ref in zip(_progress(samples, "merged logits"), reference):
                got = torch_logits(reloaded, collator, sample)[0]
                diffs.append(float((got - ref).abs().max()))
                scale = max(scale, float(ref.abs().max()))
            tolerance = MERGE_TOLERANCE[dtype] * scale
            verification = {
                "ran": True,
                "samples": len(samples),
                "samples_source": samples_source,
                "compared": f"merged ({dtype}) vs base float32 + unmerged adapter, logits with token_type_ids",
                "max_abs_logit_diff": max(diffs),
                "max_abs_logit": scale,
                "tolerance": tolerance,
                # max |adapter - base|: the merged model must be much closer to the adapter than the base is
                "adapter_effect": effect,
                "passed": max(diffs) <= tolerance and (effect == 0.0 or max(diffs) < 0.5 * effect),
            }
            del reloaded
        manifest = {
            "what": "merged LoRA model",
            "base_model": base_model,
            "base_revision": base_revision,
            "base_local_dir": str(base_dir) if base_dir else None,
            "adapter": _adapter_summary(lora, weights),
            "dtype": dtype,
            "merged_in": "float32 (unquantised base)",
            # A QLoRA adapter was trained against a 4-bit base; merged here into the unquantised one.
            "adapter_trained_with_qlora": _run_config(lora).get("use_qlora"),
            "frame_layout": _frame_layout(lora),
            "tokenizer_files_copied_from_base": copied,
            "created": _now(),
            "seconds": round(time.time() - started, 2),
            "versions": package_versions(),
            "verification": verification,
        }
        atomic_write_json(staging / MERGE_MANIFEST, manifest)
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------- MLX fixes
# Each fix takes the config dict and returns a description when it changed something, else None.
def fix_mm_tokens_in_text_config(config: dict) -> str | None:
    """mlx-vlm reads `mm_tokens_per_image` from text_config (default 256): the projector's pooling
    kernel comes from it (tiny model: a crash; other values: wrongly pooled images)."""
    value = config.get("mm_tokens_per_image")
    text = config.setdefault("text_config", {})
    if value is None or text.get("mm_tokens_per_image") == value:
        return None
    text["mm_tokens_per_image"] = value
    return f"text_config.mm_tokens_per_image = {value} (copied from the top level)"


def fix_top_level_hidden_size(config: dict) -> str | None:
    """mlx-vlm divides image features by sqrt(top-level hidden_size) (default 2048) before the text
    model multiplies every embedding by sqrt(text hidden_size): a wrong value gives wrong logits."""
    value = config.get("text_config", {}).get("hidden_size")
    if value is None or config.get("hidden_size") == value:
        return None
    config["hidden_size"] = value
    return f"hidden_size = {value} (top level, from text_config)"


def fix_rope_parameters(config: dict) -> str | None:
    """transformers 5 writes `rope_parameters` per attention type; mlx-vlm reads `rope_scaling`,
    `rope_local_base_freq` and `rope_global_base_freq` and silently uses defaults otherwise (dropping
    e.g. gemma-3-4b's linear x8 scaling of the global layers)."""
    text = config.get("text_config", {})
    params = text.get("rope_parameters")
    if not isinstance(params, dict):
        return None
    full = params.get("full_attention", params)
    sliding = params.get("sliding_attention")
    changes = []
    if "rope_theta" in full:
        for key in ("rope_theta", "rope_global_base_freq"):
            if text.get(key) != full["rope_theta"]:
                text[key] = full["rope_theta"]
                changes.append(f"{key}={full['rope_theta']}")
    if sliding and "rope_theta" in sliding and text.get("rope_local_base_freq") != sliding["rope_theta"]:
        text["rope_local_base_freq"] = sliding["rope_theta"]
        changes.append(f"rope_local_base_freq={sliding['rope_theta']}")
    rope_type = full.get("rope_type", "default")
    if rope_type != "default":
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        if text.get("rope_scaling") != scaling:
            text["rope_scaling"] = scaling
            changes.append(f"rope_scaling={scaling}")
    if not changes:
        return None
    return "text_config from rope_parameters: " + ", ".join(changes)


CONFIG_FIXES: tuple[Callable[[dict], str | None], ...] = (
    fix_mm_tokens_in_text_config,
    fix_top_level_hidden_size,
    fix_rope_parameters,
)
VISION_PREFIX_FIX = "vision_tower.* weights renamed to vision_tower.vision_model.*"
MLX_FIXES = [f.__name__ for f in CONFIG_FIXES] + ["fix_vision_tower_prefix"]


def apply_config_fixes(config: dict) -> list[dict[str, str]]:
    """Apply every config fix that is needed; [{"fix": name, "change": what changed}] for those."""
    applied = []
    for fix in CONFIG_FIXES:
        change = fix(config)
        if change:
            applied.append({"fix": fix.__name__, "change": change})
    return applied


def _renamed(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def fix_vision_tower_prefix(folder: Path) -> str | None:
    """transformers 5 saves SigLIP weights as `vision_tower.*`; mlx-vlm expects
    `vision_tower.vision_model.*`. Rewrites only the shards that need it (and the index)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    renamed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            keys = list(fh.keys())
            metadata = fh.metadata() or {}
        if all(_renamed(k) == k for k in keys):
            continue
        tensors = load_file(shard)
        out = {_renamed(k): v for k, v in tensors.items()}
        renamed += sum(_renamed(k) != k for k in keys)
        tmp = shard.with_name(f".{shard.name}.tmp")
        save_file(out, tmp, metadata={**metadata, "format": "pt"})
        if shard.is_symlink():
            shard.unlink()
        os.replace(tmp, shard)
        del tensors, out
    index = folder / "model.safetensors.index.json"
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_renamed(k): v for k, v in data.get("weight_map", {}).items()}
        if index.is_symlink():
            index.unlink()
        atomic_write_json(index, data)
    return f"{VISION_PREFIX_FIX} ({renamed} tensors)" if renamed else None


def prepare_mlx_source(model_path: Path, work_dir: Path) -> list[dict[str, str]]:
    """A fixed copy of `model_path` in `work_dir` (weights linked unless rewritten); the fixes applied."""
    for item in model_path.iterdir():
        dest = work_dir / item.name
        if item.is_dir():
            shutil.copytree(item, dest)
        elif item.suffix == ".safetensors":
            os.symlink(item.resolve(), dest)  # read-only use; a rewritten shard replaces the link
        else:
            shutil.copy2(item, dest)
    config = json.loads((work_dir / "config.json").read_text())
    fixes = apply_config_fixes(config)
    if fixes:
        (work_dir / "config.json").unlink()
        atomic_write_json(work_dir / "config.json", config)
    vision = fix_vision_tower_prefix(work_dir)
    if vision:
        fixes.append({"fix": "fix_vision_tower_prefix", "change": vision})
    return fixes


def _source_dtype(config: dict) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def run_mlx_converter(source: Path, output: Path, *, bits: int | None, group_size: int, dtype: str) -> float:
    """`mlx_vlm convert` in a subprocess, offline; returns seconds. Its output is logged line by line."""
    cmd = [
        sys.executable,
        "-m",
        "mlx_vlm",
        "convert",
        "--hf-path",
        str(source),
        "--mlx-path",
        str(output),
        "--dtype",
        dtype,
    ]
    if bits:
        cmd += ["-q", "--q-bits", str(bits), "--q-group-size", str(group_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.info("converting with mlx-vlm (%s%s)", dtype, f", {bits}-bit group {group_size}" if bits else "")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail = (tail + [line])[-20:]
            if line.startswith("[INFO]"):
                log.info("mlx-vlm: %s", line[6:].strip())
    if proc.wait() != 0:
        errors = [t for t in tail if "Error" in t or "error" in t] or tail or ["no output"]
        raise ExportError(f"mlx-vlm conversion failed (exit {proc.returncode}): {errors[-1]}")
    if not any(output.glob("*.safetensors")):
        raise ExportError(f"mlx-vlm conversion wrote no weights to {output}")
    return time.time() - started


def mlx_vlm_default_bos_count(mlx_dir: Path, n_images: int = 4) -> int:
    """How many `<bos>` mlx-vlm's own prompt path (its chat template helper + its processor +
    `should_add_special_tokens`) produces for our prompt. We never use that path (MlxButtonScorer
    encodes with the transformers processor); this records whether it would double the `<bos>`."""
    from .mlx_backend import import_mlx_vlm

    import_mlx_vlm()
    from mlx_vlm.models.gemma3.processing_gemma3 import Gemma3Processor as MlxGemma3Processor
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import load_config, should_add_special_tokens

    processor = MlxGemma3Processor.from_pretrained(str(mlx_dir))
    config = load_config(mlx_dir)
    text = apply_chat_template(processor, config, QUESTION, num_images=n_images)
    add = should_add_special_tokens(config.get("model_type", ""), processor)
    ids = processor.tokenizer(text, add_special_tokens=add)["input_ids"]
    return sum(1 for i in ids if i == processor.tokenizer.bos_token_id)


# --------------------------------------------------------------------------- MLX verification
class MlxNormaliser:
    """Make a PyTorch Gemma 3 use mlx-vlm's embedding normaliser while inside the block.

    Measured: mlx-vlm multiplies embeddings by sqrt(hidden_size) rounded to bfloat16 (as transformers
    itself does when running in bf16) and divides image features by the exact value first; float32
    transformers uses the exact value. For hidden sizes whose root is not a bf16 number (gemma-3-4b:
    2560 -> 50.596 vs 50.5) that alone moves float32 logits by ~1e-3 (tiny hidden 128: 1.7e-3), which
    says nothing about the conversion. The logits check therefore compares against PyTorch with the
    same normaliser, and also reports the difference from exact PyTorch."""

    def __init__(self, model):
        import torch

        self.embedding = model.get_input_embeddings()
        self.projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
        self.exact = float(self.embedding.embed_scale) if hasattr(self.embedding, "embed_scale") else None
        self.rounded = None if self.exact is None else float(torch.tensor(self.exact).to(torch.bfloat16))
        self.hook = None

    @property
    def needed(self) -> bool:
        return self.exact is not None and self.rounded != self.exact

    def __enter__(self):
        if self.needed:
            self.embedding.embed_scale.fill_(self.rounded)
            ratio = self.rounded / self.exact
            if self.projector is not None:
                self.hook = self.projector.register_forward_hook(lambda _m, _i, out: out * ratio)
        return self

    def __exit__(self, *exc):
        if self.needed:
            self.embedding.embed_scale.fill_(self.exact)
            if self.hook is not None:
                self.hook.remove()
        return False


def verify_mlx(
    reference_dir: Path,
    float_dir: Path,
    export_dir: Path,
    samples: list[VerifySample],
    *,
    n_logit_samples: int,
    quantized: bool,
    frame_layout: str = "images",
) -> dict[str, Any]:
    """Compare the MLX export with PyTorch on the same token ids and pixels.

    - logits: MLX float32 (of the unquantised fixed weights in `float_dir`) vs PyTorch float32
      without token_type_ids (both causal inside images): max |diff| must be <= 1e-3.
    - buttons: the export's 8-button choice vs PyTorch's, with (training-time, bidirectional images)
      and without token_type_ids; with quantisation the latter must agree on >= 90% of samples."""
    from .collate import Collator
    from .mlx_backend import MlxButtonScorer
    from .modeling import load_model, load_processor
    from .scoring import ButtonScorer

    started = time.time()
    processor = load_processor(str(reference_dir))
    collator = Collator(processor, max_seq_length=8192, frame_layout=frame_layout)
    pt = load_model(str(reference_dir), precision="fp32").eval()
    pt_causal = ButtonScorer(pt, collator, causal_images=True)
    pt_bidir = ButtonScorer(pt, collator)

    mlx32 = MlxButtonScorer(float_dir, frame_layout=frame_layout, dtype="float32")
    normaliser = MlxNormaliser(pt)
    logit_diffs, exact_diffs, tti_diffs, scale = [], [], [], 0.0
    for sample in _progress(samples[:n_logit_samples], "logits MLX vs PyTorch"):
        exact, enc = torch_logits(pt, collator, sample, token_type_ids=False)
        with normaliser:
            ref, _ = torch_logits(pt, collator, sample, token_type_ids=False)
        with_tti, _ = torch_logits(pt, collator, sample, token_type_ids=True)
        got = mlx32.logits(enc.input_ids.numpy(), images=collator.images_for([], sample.frames))
        logit_diffs.append(float(np.abs(got - ref.numpy()).max()))
        exact_diffs.append(float(np.abs(got - exact.numpy()).max()))
        tti_diffs.append(float(np.abs(got - with_tti.numpy()).max()))
        scale = max(scale, float(exact.abs().max()))
    del mlx32

    exported = MlxButtonScorer(export_dir, frame_layout=frame_layout)
    rows = []
    for sample in _progress(samples, "buttons MLX vs PyTorch"):
        r = sample.record
        t0 = time.perf_counter()
        m = exported.score(sample.frames, r.context, r.question)
        mlx_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        c = pt_causal.score(sample.frames, r.context, r.question)
        pt_s = time.perf_counter() - t0
        b = pt_bidir.score(sample.frames, r.context, r.question)
        rows.append(
            {
                "true": r.button,
                "mlx": m.button,
                "pt_causal": c.button,
                "pt_bidir": b.button,
                "logprob_diff": max(abs(m.logprobs[k] - c.logprobs[k]) for k in m.logprobs),
                "mlx_s": mlx_s,
                "pt_s": pt_s,
            }
        )
    n = len(rows)

    def rate(key_a: str, key_b: str) -> float:
        return sum(row[key_a] == row[key_b] for row in rows) / n if n else float("nan")

    logits_ok = bool(logit_diffs) and max(logit_diffs) <= MLX_LOGIT_TOLERANCE
    agreement = rate("mlx", "pt_causal")
    buttons_ok = (agreement >= MIN_BUTTON_AGREEMENT) if quantized else True
    return {
        "ran": True,
        "logits": {
            "samples": len(logit_diffs),
            "compared": "MLX float32 (unquantised fixed weights) vs PyTorch float32 without token_type_ids"
            + (" using mlx-vlm's bf16-rounded embedding normaliser" if normaliser.needed else ""),
            "max_abs_diff": max(logit_diffs) if logit_diffs else None,
            "tolerance": MLX_LOGIT_TOLERANCE,
            "embed_scale": {"exact": normaliser.exact, "mlx_vlm_bf16": normaliser.rounded},
            "max_abs_diff_vs_exact_pytorch": max(exact_diffs) if exact_diffs else None,
            "max_abs_logit": scale,
            "max_abs_diff_vs_pytorch_with_token_type_ids": max(tti_diffs) if tti_diffs else None,
            "passed": logits_ok,
        },
        "buttons": {
            "samples": n,
            "agreement_vs_pytorch_causal": agreement,
            "agreement_vs_pytorch_with_token_type_ids": rate("mlx", "pt_bidir"),
            "pytorch_causal_vs_with_token_type_ids": rate("pt_causal", "pt_bidir"),
            "accuracy": {
                "mlx": rate("mlx", "true"),
                "pytorch_causal": rate("pt_causal", "true"),
                "pytorch_with_token_type_ids": rate("pt_bidir", "true"),
            },
            "max_abs_answer_logprob_diff_vs_pytorch_causal": max(r["logprob_diff"] for r in rows) if rows else None,
            "required_agreement": MIN_BUTTON_AGREEMENT if quantized else None,
            "passed": buttons_ok,
        },
        "timing": {
            "mlx_score_s_mean": float(np.mean([r["mlx_s"] for r in rows])) if rows else None,
            "pytorch_score_s_mean": float(np.mean([r["pt_s"] for r in rows])) if rows else None,
            "verify_s": round(time.time() - started, 2),
        },
        "passed": logits_ok and buttons_ok,
    }


def export_mlx(
    model_path: str | Path,
    output_path: str | Path,
    *,
    quantization_bits: int | None = 4,
    group_size: int = 64,
    verify: bool = True,
    overwrite: bool = False,
    verify_data: str | None = None,
    n_samples: int = 32,
    n_logit_samples: int = 3,
) -> dict[str, Any]:
    """Fix a copy, convert, verify, write `export_manifest.json`; returns the manifest. Raises
    ExportError; a verification failure still publishes the folder with `verification.passed: false`."""
    source = Path(model_path)
    if quantization_bits not in (None, 4, 8):
        raise ExportError(f"--quantization_bits must be 4, 8 or none, got {quantization_bits!r}", code=2)
    if not (source / "config.json").is_file():
        if (source / "adapter_config.json").is_file():
            raise ExportError(f"{source}: is a LoRA adapter (merge it first: scripts/merge_qlora.py)", code=2)
        raise ExportError(f"{source}/config.json: missing (pass a merged Gemma 3 folder)", code=2)
    try:
        config = json.loads((source / "config.json").read_text())
    except ValueError as exc:
        raise ExportError(f"{source}/config.json: invalid JSON ({exc})", code=2) from None
    if config.get("model_type") != "gemma3":
        raise ExportError(
            f"{source}/config.json: model_type {config.get('model_type')!r} is not gemma3 "
            "(export a merged Gemma 3 folder)",
            code=2,
        )
    if not any(source.glob("*.safetensors")):
        raise ExportError(f"{source}: no *.safetensors weights (save the model with safe_serialization)", code=2)
    output = check_output_dir(output_path, overwrite)
    source_bytes = _weights_bytes(source)
    check_free_disk(output.parent, int(source_bytes * 2.1))  # a rewritten copy + an unquantised export

    dtype = _source_dtype(config)
    merge_manifest = None
    if (source / MERGE_MANIFEST).is_file():
        merge_manifest = json.loads((source / MERGE_MANIFEST).read_text())
    frame_layout = (merge_manifest or {}).get("frame_layout") or "images"
    samples, samples_source = load_samples(verify_data, n_samples) if verify else ([], None)

    work = _staging_dir(output, "mlx-src")
    staging = output.parent / f".{output.name}.mlx-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fixes = prepare_mlx_source(source, work)
        for fix in fixes:
            log.info("fix applied: %s", fix["change"])
        convert_s = run_mlx_converter(work, staging, bits=quantization_bits, group_size=group_size, dtype=dtype)
        # mlx-vlm re-saves the processor with its own class: keep the merged folder's files byte for byte.
        copied = copy_tokenizer_files(source, staging, replace=True)
        verification: dict[str, Any] = {"ran": False}
        if verify:
            verification = verify_mlx(
                source,
                work,
                staging,
                samples,
                n_logit_samples=n_logit_samples,
                quantized=quantization_bits is not None,
                frame_layout=frame_layout,
            )
            verification["samples_source"] = samples_source
        manifest = {
            "what": "MLX export (mlx-vlm)",
            "source": str(source.resolve()),
            "source_merge_manifest": merge_manifest,
            "quantization": {"bits": quantization_bits, "group_size": group_size} if quantization_bits else None,
            "dtype": dtype,
            "frame_layout": frame_layout,
            "fixes_applied": fixes,
            "fixes_checked": MLX_FIXES,
            "tokenizer_files_copied_from_source": copied,
            "converter": "python -m mlx_vlm convert (subprocess, HF_HUB_OFFLINE=1)",
            "known_differences": {
                "image_attention": "mlx-vlm attends causally inside images; transformers with token_type_ids "
                "(training) attends bidirectionally: see buttons.agreement_*",
                "mlx_vlm_default_prompt_bos_count": mlx_vlm_default_bos_count(staging),
                "scorer_prompt_bos_count": 1,
            },
            "created": _now(),
            "timings": {"convert_s": round(convert_s, 2)},
            "versions": package_versions(),
            "verification": verification,
        }
        atomic_write_json(staging / EXPORT_MANIFEST, manifest)
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, disable=not items or not sys.stderr.isatty())
