"""Merge a LoRA adapter into its base model, verified.

The base is loaded unquantised in float32 (a QLoRA adapter is never merged into 4-bit weights),
the adapter is merged with peft's `merge_and_unload`, and the result is saved in the requested
dtype with the processor, every tokenizer file the base had and `merge_manifest.json`.
Verification compares the merged model's logits with the unmerged adapter's on fixed 4-frame samples.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from ..artifacts import (
    ADAPTER_CONFIG,
    MERGE_MANIFEST,
    RUN_CONFIG,
    ArtifactError,
    adapter_weights,
    read_json,
    run_config_path,
)
from ..artifacts import frame_layout as recorded_frame_layout
from ..fileio import atomic_write_json, file_sha256, now_iso, staged_dir
from ..hub_names import rename_to_hub
from .common import (
    ExportError,
    check_free_disk,
    check_output_dir,
    copy_tokenizer_files,
    load_samples,
    package_versions,
    resolve_local_dir,
    torch_logits,
    verify_progress,
    weights_bytes,
)

log = logging.getLogger(__name__)

MERGE_DTYPES = ("bf16", "fp16", "fp32")
# Max |logit| difference merged vs adapter, relative to max(1, max |logit|): float32 only reorders
# sums; 16-bit dtypes round every weight once more (measured on the tiny model: fp32 8e-7,
# bf16 1.8e-2, fp16 2.6e-3 of the logit scale).
MERGE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


def validate_adapter(lora_path: str | Path) -> Path:
    """The adapter weights file; one-line errors (exit code 2) for a missing folder or files."""
    try:
        return adapter_weights(lora_path)
    except ArtifactError as exc:
        raise ExportError(str(exc), code=2) from None


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
    cfg = read_json(lora_path / ADAPTER_CONFIG) or {}
    return {
        "path": str(lora_path.resolve()),
        "weights_file": weights.name,
        "sha256": file_sha256(weights),
        "config_sha256": file_sha256(lora_path / ADAPTER_CONFIG),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "target_modules": cfg.get("target_modules"),
    }


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

    from ..collate import Collator
    from ..modeling import DTYPES, ModelLoadError, load_model, load_processor

    if dtype not in MERGE_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}", code=2)
    lora = Path(lora_path)
    weights = validate_adapter(lora)
    output = check_output_dir(output_path, overwrite)
    base_dir = resolve_local_dir(base_model, token)
    bytes_per_param = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    if base_dir is not None and weights_bytes(base_dir):
        # Checkpoints on the hub are bf16: the merged folder is about their size times this ratio.
        check_free_disk(output.parent, int(weights_bytes(base_dir) * bytes_per_param / 2 * 1.05))

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

    run_config_file = run_config_path(lora)
    run_config = read_json(run_config_file) if run_config_file else {}
    layout = recorded_frame_layout(lora)
    collator = Collator(processor, max_seq_length=8192, frame_layout=layout or "images")
    reference, effect = [], 0.0
    for sample in verify_progress(samples, "adapter logits"):
        reference.append(torch_logits(model, collator, sample)[0])
        with model.disable_adapter():  # how far the adapter moves the base: a merge must keep that
            effect = max(effect, float((torch_logits(model, collator, sample)[0] - reference[-1]).abs().max()))

    merged = model.merge_and_unload()
    merged.to(DTYPES[dtype])
    n_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    check_free_disk(output.parent, int(n_bytes * 1.05))
    with staged_dir(output, tag="merge") as staging:
        merged.save_pretrained(staging)
        # The hub's weight names, whatever the base had (a flat base is saved flat by transformers 5):
        # transformers, mlx-vlm's and llama.cpp's converters then read the folder without fixes.
        renamed = rename_to_hub(staging)
        processor.save_pretrained(staging)
        copied = copy_tokenizer_files(base_dir, staging)
        if run_config_file:  # frame_layout etc. for the evaluator and server (secrets masked by training)
            shutil.copy2(run_config_file, staging / RUN_CONFIG)
        del model, merged

        verification: dict[str, Any] = {"ran": False}
        if verify:
            reloaded = AutoModelForImageTextToText.from_pretrained(staging, dtype=DTYPES[dtype]).eval()
            diffs, scale = [], 1.0
            for sample, ref in zip(verify_progress(samples, "merged logits"), reference):
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
            "adapter_trained_with_qlora": (run_config or {}).get("use_qlora"),
            "frame_layout": layout,
            "tokenizer_files_copied_from_base": copied,
            "weight_names": "hub (vision_tower.vision_model.*, language_model.model.*, multi_modal_projector.*)",
            "tensors_renamed_to_hub_names": renamed,
            "created": now_iso(),
            "seconds": round(time.time() - started, 2),
            "versions": package_versions(),
            "verification": verification,
        }
        atomic_write_json(staging / MERGE_MANIFEST, manifest)
    return manifest
