"""Export a merged Gemma 3 folder to MLX with mlx-vlm (it keeps the vision tower; mlx-lm drops it),
verified against PyTorch.

The fixes of `mlx_fixes` are applied to a copy, the converter runs offline in a subprocess, and
`export_manifest.json` records the fixes applied, the versions and the verification figures: MLX
float32 logits vs PyTorch without `token_type_ids` (both causal: must agree within 1e-3), and the
button chosen by the export vs PyTorch with and without `token_type_ids` on a fixed eval set.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import MERGE_MANIFEST, MLX_MANIFEST, read_json
from ..artifacts import frame_layout as recorded_frame_layout
from ..dataset import QUESTION
from ..families import FamilyError, family_of
from ..fileio import atomic_write_json, now_iso, scratch_dir, staged_dir
from .common import (
    MIN_BUTTON_AGREEMENT,
    ExportError,
    VerifySample,
    agreement_refusal,
    check_free_disk,
    check_output_dir,
    check_source_folder,
    copy_tokenizer_files,
    load_samples,
    package_versions,
    torch_logits,
    verify_progress,
    warn_few_samples,
    weights_bytes,
)
from .mlx_fixes import prepare_mlx_source

log = logging.getLogger(__name__)

MLX_LOGIT_TOLERANCE = 1e-3


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
    from ..backends.mlx_backend import import_mlx_vlm

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
    from ..backends.mlx_backend import MlxButtonScorer
    from ..collate import Collator
    from ..modeling import load_model, load_processor
    from ..scoring import ButtonScorer

    started = time.time()
    processor = load_processor(str(reference_dir))
    collator = Collator(processor, max_seq_length=8192, frame_layout=frame_layout)
    pt = load_model(str(reference_dir), precision="fp32").eval()
    pt_causal = ButtonScorer(pt, collator, causal_images=True)
    pt_bidir = ButtonScorer(pt, collator)

    mlx32 = MlxButtonScorer(float_dir, frame_layout=frame_layout, dtype="float32")
    normaliser = MlxNormaliser(pt)
    logit_diffs, exact_diffs, tti_diffs, scale = [], [], [], 0.0
    for sample in verify_progress(samples[:n_logit_samples], "logits MLX vs PyTorch"):
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
    for sample in verify_progress(samples, "buttons MLX vs PyTorch"):
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
    agreed = sum(row["mlx"] == row["pt_causal"] for row in rows)

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
            "agreed": agreed,
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


def refusal(verification: dict[str, Any], bits: int | None, output: Path) -> str | None:
    """The one-line reason a verified export is refused (None when it passed): the figure, the
    required value and the remedy."""
    if verification.get("passed", True):
        return None
    where = f"see {output / MLX_MANIFEST}"
    lg, bt = verification["logits"], verification["buttons"]
    if not lg["passed"]:
        return (
            f"{output}: MLX export failed verification: float32 logits differ from PyTorch by "
            f"{lg['max_abs_diff']:.3g}, above {lg['tolerance']:g} ({where}; --no-verify keeps it unverified)"
        )
    remedy = "--quantization_bits 8 or none" if bits == 4 else "--quantization_bits none"
    return agreement_refusal(
        f"{output}: MLX export ({bits}-bit)", bt["agreed"], bt["samples"], MIN_BUTTON_AGREEMENT, remedy, where
    )


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
    config = check_source_folder(source)
    try:
        family = family_of(config.get("model_type"))
    except FamilyError as exc:
        raise ExportError(f"{source}/config.json: {exc}", code=2) from None
    unsupported = family.mlx_unsupported_reason(config)
    if unsupported:
        raise ExportError(f"{source}: {unsupported}", code=2)
    output = check_output_dir(output_path, overwrite)
    source_bytes = weights_bytes(source)
    check_free_disk(output.parent, int(source_bytes * 2.1))  # a rewritten copy + an unquantised export

    dtype = _source_dtype(config)
    merge_manifest = read_json(source / MERGE_MANIFEST)
    frame_layout = recorded_frame_layout(source) or "images"
    samples, samples_source = load_samples(verify_data, n_samples) if verify else ([], None)
    if verify and quantization_bits:
        warn_few_samples(len(samples), "MLX")

    with staged_dir(output, tag="mlx") as staging, scratch_dir(output, "mlx-src") as work:
        fixes = prepare_mlx_source(source, work, family.mlx_fixes)
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
            "fixes_checked": list(family.mlx_fixes),
            "tokenizer_files_copied_from_source": copied,
            "converter": "python -m mlx_vlm convert (subprocess, HF_HUB_OFFLINE=1)",
            "known_differences": {
                "image_attention": "mlx-vlm attends causally inside images; transformers with token_type_ids "
                "(training) attends bidirectionally: see buttons.agreement_*",
                "mlx_vlm_default_prompt_bos_count": mlx_vlm_default_bos_count(staging)
                if family.name == "gemma3"  # the check uses mlx-vlm's Gemma 3 processor
                else None,
                "scorer_prompt_bos_count": 1,
            },
            "created": now_iso(),
            "timings": {"convert_s": round(convert_s, 2)},
            "versions": package_versions(),
            "verification": verification,
        }
        atomic_write_json(staging / MLX_MANIFEST, manifest)
    return manifest
