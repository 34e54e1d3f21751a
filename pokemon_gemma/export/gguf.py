"""Export a merged Gemma 3 folder to GGUF (text model + `mmproj` vision projector) with llama.cpp's
own converter, verified against PyTorch with the GGUF backend (llama-cpp-python).

- The converter is `convert_hf_to_gguf.py` of the llama.cpp that the pinned llama-cpp-python sdist
  vendors (`export.llama_cpp`); it runs twice in subprocesses, offline: the text model, then
  `--mmproj`. No weight is converted by hand here.
- The merged folder is converted as it is when it has the hub's weight names (every folder this
  project writes); an older, flat folder gets them in a staging copy (`hub_names`). A tokenizer
  that is only a byte-level BPE `tokenizer.json` (the tiny test model; real Gemma 3 folders carry
  `tokenizer.model` and take the sentencepiece path) is identified as llama.cpp's "gpt-2"
  pre-tokenizer when its hash is unknown: the converter otherwise refuses every vocabulary it has
  not seen. Both are recorded in `gguf_manifest.json`.
- The export folder holds `model-<q>.gguf`, `mmproj-<q>.gguf`, the transformers tokenizer and
  processor files (the GGUF backend builds the training prompt with them) and the manifest
  (sizes, sha256, converter and package versions, verification).
- Verification on fixed samples: the 8-answer choice of the GGUF backend vs PyTorch float32 *with*
  `token_type_ids` (training-time attention; llama.cpp attends bidirectionally inside Gemma 3
  images too) must agree on >= 90% for f16/q8_0; f32 logits must be within 2e-3 of the logit scale.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import GGUF_MANIFEST, MERGE_MANIFEST, read_json
from ..artifacts import frame_layout as recorded_frame_layout
from ..fileio import atomic_write_json, file_sha256, now_iso, scratch_dir, staged_dir
from ..hub_names import flat_keys, rename_to_hub
from .common import (
    MIN_BUTTON_AGREEMENT,
    TOKENIZER_FILES,
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
from .llama_cpp import converter_info, find_converter

log = logging.getLogger(__name__)

GGUF_QUANTIZATIONS = ("f32", "f16", "q8_0")
# f32 GGUF vs PyTorch float32: max |logit diff| <= this x max(1, max |logit|). llama.cpp is not
# bit-faithful even in f32: its KV cache is f16, the converter stores the projector matrix as F16,
# and ggml computes GELU through an f16 table. Measured on the tiny model: 5.5e-4 (random) and
# 6.8e-4 (trained) of the logit scale.
GGUF_F32_TOLERANCE = 2e-3
CLEAR_MARGIN = 0.1  # nats between PyTorch's top two answers: agreement on these is reported apart

# Runs in the converter's subprocess: llama.cpp's converter once per output file (text model, then
# mmproj) in one interpreter (torch/transformers are imported once), with BPE pre-tokenizer
# detection widened to one more case: an unknown hash of a ByteLevel pre-tokenizer with the GPT-2
# regex, which is exactly llama.cpp's "gpt-2" pre-tokenizer. Every other unknown vocabulary fails.
BOOTSTRAP = r"""
import json, logging, runpy, sys
from pathlib import Path
llama_cpp_dir, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
script = str(llama_cpp_dir / "convert_hf_to_gguf.py")
sys.path.insert(0, str(llama_cpp_dir))
sys.path.insert(1, str(llama_cpp_dir / "gguf-py"))
from conversion import base
_known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _known(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(self.dir_model) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            logging.getLogger("hf-to-gguf").warning("pokemon-gemma: unknown ByteLevel BPE vocabulary -> 'gpt-2'")
            return "gpt-2"
        raise
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
for label, args in runs:
    print(f"pokemon-gemma: converting {label}", file=sys.stderr, flush=True)
    sys.argv = [script] + args
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
"""

CONVERTER_STEP = "pokemon-gemma: converting "


def run_gguf_converter(
    converter_dir: Path, source: Path, outputs: dict[str, Path], *, outtype: str, model_name: str
) -> float:
    """`convert_hf_to_gguf.py` for each of `outputs` ("text" and/or "mmproj" -> file) in one
    subprocess, offline; returns seconds. ExportError naming the part that failed and why."""
    runs = []
    for label, outfile in outputs.items():
        # --model-name: else general.name comes from the staging folder's name.
        args = [str(source), "--outfile", str(outfile), "--outtype", outtype, "--model-name", model_name]
        runs.append([label, args + (["--mmproj"] if label == "mmproj" else [])])
    cmd = [sys.executable, "-c", BOOTSTRAP, str(converter_dir), json.dumps(runs)]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, never PyPI's
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log.info("converting %s with llama.cpp (%s)", " and ".join(outputs), outtype)
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    missing = [label for label, outfile in outputs.items() if not outfile.is_file()]
    if proc.returncode != 0 or missing:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        steps = [ln[len(CONVERTER_STEP) :] for ln in lines if ln.startswith(CONVERTER_STEP)]
        what = steps[-1] if steps else (missing or ["model"])[0]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines or ["no output"]
        reason = errors[-1]
        if "pre-tokenizer was not recognized" in reason:
            reason += " (the folder has no tokenizer.model: copy the base model's into it)"
        raise ExportError(f"llama.cpp conversion of the {what} failed (exit {proc.returncode}): {reason}")
    return time.time() - started


def prepare_gguf_source(model_path: Path, work_dir: Path) -> list[dict[str, str]]:
    """A copy of `model_path` in `work_dir` (weights linked, rewritten only when renamed); the
    fixes applied."""
    for item in model_path.iterdir():
        dest = work_dir / item.name
        if item.is_dir():
            continue  # no sub-folder is part of a model (e.g. a checkpoint left beside it)
        if item.suffix == ".safetensors":
            os.symlink(item.resolve(), dest)
        else:
            shutil.copy2(item, dest)
    fixes = []
    renamed = rename_to_hub(work_dir)
    if renamed:
        fixes.append(
            {
                "fix": "hub_weight_names",
                "change": f"vision_tower.* renamed to vision_tower.vision_model.* ({renamed} tensors; a flat folder "
                "from an older tiny builder: llama.cpp's tensor map knows only the hub's names)",
            }
        )
    return fixes


def vocabulary(model_path: Path) -> str:
    if (model_path / "tokenizer.model").is_file():
        return "sentencepiece (tokenizer.model)"
    pre = ((read_json(model_path / "tokenizer.json") or {}).get("pre_tokenizer")) or {}
    kind = pre.get("type", "?")
    return f"BPE tokenizer.json ({kind} pre-tokenizer; an unknown ByteLevel hash is read as llama.cpp's 'gpt-2')"


# --------------------------------------------------------------------------- verification
def verify_gguf(
    reference_dir: Path,
    export_dir: Path,
    samples: list[VerifySample],
    *,
    quantization: str,
    n_logit_samples: int,
    frame_layout: str = "images",
) -> dict[str, Any]:
    """The GGUF backend vs PyTorch float32 with token_type_ids, on the same token ids and pixels."""
    import torch

    from ..backends.gguf_backend import GgufButtonScorer
    from ..collate import Collator
    from ..modeling import load_model, load_processor
    from ..scoring import ButtonScorer

    started = time.time()
    collator = Collator(load_processor(str(reference_dir)), max_seq_length=8192, frame_layout=frame_layout)
    pt = load_model(str(reference_dir), precision="fp32").eval()
    pt_scorer = ButtonScorer(pt, collator)
    gguf = GgufButtonScorer(export_dir, frame_layout=frame_layout, max_seq_length=8192)
    try:
        logit_diffs, feature_diffs, scale = [], [], 0.0
        for sample in verify_progress(samples[:n_logit_samples], "logits GGUF vs PyTorch"):
            ref, enc = torch_logits(pt, collator, sample, token_type_ids=True)
            got = gguf.logits(enc.input_ids.tolist(), sample.frames)
            text = ~np.isnan(got[:, 0])  # image positions have no logits of their own in llama.cpp
            logit_diffs.append(float(np.abs(got[text] - ref.numpy()[text]).max()))
            scale = max(scale, float(ref.abs().max()))
            images = collator.images_for([], sample.frames)
            with torch.no_grad():
                theirs = pt_scorer.image_features(images).float().numpy()
            feature_diffs.append(float(np.abs(gguf.image_features(images) - theirs).max()))
        rows = []
        for sample in verify_progress(samples, "buttons GGUF vs PyTorch"):
            r = sample.record
            t0 = time.perf_counter()
            g = gguf.score(sample.frames, r.context, r.question)
            gguf_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            p = pt_scorer.score(sample.frames, r.context, r.question)
            pt_s = time.perf_counter() - t0
            top = sorted(p.logprobs.values())
            rows.append(
                {
                    "true": r.button,
                    "gguf": g.button,
                    "pytorch": p.button,
                    "logprob_diff": max(abs(g.logprobs[b] - p.logprobs[b]) for b in p.logprobs),
                    "pytorch_margin": top[-1] - top[-2],
                    "gguf_s": gguf_s,
                    "pt_s": pt_s,
                }
            )
        non_causal = gguf.model.non_causal_images
        threads = gguf.model.n_threads
    finally:
        gguf.close()

    n = len(rows)
    agreed = sum(r["gguf"] == r["pytorch"] for r in rows)
    clear = [r for r in rows if r["pytorch_margin"] >= CLEAR_MARGIN]
    tolerance = GGUF_F32_TOLERANCE * max(1.0, scale)
    max_diff = max(logit_diffs) if logit_diffs else None
    gated_logits = quantization == "f32"
    logits_ok = (max_diff is not None and max_diff <= tolerance) if gated_logits else True
    buttons_ok = (n > 0 and agreed / n >= MIN_BUTTON_AGREEMENT) if not gated_logits else True
    return {
        "ran": True,
        "compared": "GGUF (llama-cpp-python, f16 KV cache) vs PyTorch float32 with token_type_ids "
        "(bidirectional attention inside images, as in training)",
        "logits": {
            "samples": len(logit_diffs),
            "max_abs_diff": max_diff,
            "max_abs_logit": scale,
            "tolerance": tolerance,
            "tolerance_rule": f"{GGUF_F32_TOLERANCE:g} x max(1, max |logit|)",
            "gated": gated_logits,
            "image_features_max_abs_diff": max(feature_diffs) if feature_diffs else None,
            "passed": logits_ok,
        },
        "buttons": {
            "samples": n,
            "agreed": agreed,
            "agreement_vs_pytorch_with_token_type_ids": agreed / n if n else float("nan"),
            "required_agreement": None if gated_logits else MIN_BUTTON_AGREEMENT,
            "clear_samples": len(clear),
            "agreement_on_clear_samples": (
                sum(r["gguf"] == r["pytorch"] for r in clear) / len(clear) if clear else None
            ),
            "clear_margin_nats": CLEAR_MARGIN,
            "accuracy": {
                "gguf": sum(r["gguf"] == r["true"] for r in rows) / n if n else None,
                "pytorch": sum(r["pytorch"] == r["true"] for r in rows) / n if n else None,
            },
            "max_abs_answer_logprob_diff": max(r["logprob_diff"] for r in rows) if rows else None,
            "median_pytorch_margin": float(np.median([r["pytorch_margin"] for r in rows])) if rows else None,
            "disagreements": [
                {k: r[k] for k in ("true", "gguf", "pytorch", "pytorch_margin")}
                for r in rows
                if r["gguf"] != r["pytorch"]
            ],
            "passed": buttons_ok,
        },
        "non_causal_images": non_causal,
        "timing": {
            "threads": threads,
            "gguf_score_s_mean": float(np.mean([r["gguf_s"] for r in rows])) if rows else None,
            "pytorch_score_s_mean": float(np.mean([r["pt_s"] for r in rows])) if rows else None,
            "verify_s": round(time.time() - started, 2),
        },
        "passed": logits_ok and buttons_ok,
    }


def refusal(verification: dict[str, Any], quantization: str, output: Path) -> str | None:
    """The one-line reason a verified export is refused (None when it passed): the figure, the
    required value and the remedy."""
    if verification.get("passed", True):
        return None
    where = f"see {output / GGUF_MANIFEST}"
    lg = verification["logits"]
    if not lg["passed"]:
        return (
            f"{output}: GGUF export failed verification: f32 logits differ from PyTorch by "
            f"{lg['max_abs_diff']:.3g}, above the tolerance {lg['tolerance']:.3g} ({lg['tolerance_rule']}, "
            f"max |logit| {lg['max_abs_logit']:.3g}) on {lg['samples']} samples ({where}; --no-verify keeps it "
            "unverified)"
        )
    bt = verification["buttons"]
    remedy = "--quantization f16 or f32" if quantization == "q8_0" else "--quantization f32"
    return agreement_refusal(
        f"{output}: GGUF export ({quantization})", bt["agreed"], bt["samples"], MIN_BUTTON_AGREEMENT, remedy, where
    )


# --------------------------------------------------------------------------- export
def export_gguf(
    model_path: str | Path,
    output_dir: str | Path,
    *,
    quantization: str = "q8_0",
    verify: bool = True,
    overwrite: bool = False,
    verify_data: str | None = None,
    n_samples: int = 32,
    n_logit_samples: int = 3,
    llama_cpp_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Convert, verify, write `gguf_manifest.json`; returns the manifest. Raises ExportError; a
    verification failure still publishes the folder with `verification.passed: false`."""
    source = Path(model_path)
    if quantization not in GGUF_QUANTIZATIONS:
        raise ExportError(
            f"--quantization must be one of {', '.join(GGUF_QUANTIZATIONS)}, got {quantization!r}", code=2
        )
    config = check_source_folder(source)
    if config.get("model_type") != "gemma3":  # the GGUF export and backend are written and tested for Gemma 3
        raise ExportError(
            f"{source}/config.json: model_type {config.get('model_type')!r}: the GGUF export supports Gemma 3 only",
            code=2,
        )
    converter = find_converter(llama_cpp_dir)
    if verify:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ExportError(
                "--verify needs llama-cpp-python (run ./init.sh --gguf), or pass --no-verify", code=2
            ) from None
    output = check_output_dir(output_dir, overwrite)
    check_free_disk(output.parent, int(weights_bytes(source) * (1.1 if quantization == "f32" else 0.6)))
    merge_manifest = read_json(source / MERGE_MANIFEST)
    frame_layout = recorded_frame_layout(source) or "images"
    samples, samples_source = load_samples(verify_data, n_samples) if verify else ([], None)
    if verify and quantization != "f32":
        warn_few_samples(len(samples), "GGUF")
    flat_before = flat_keys(source)

    name = source.resolve().name
    text_file, mmproj_file = f"model-{quantization}.gguf", f"mmproj-{quantization}.gguf"
    with staged_dir(output, tag="gguf") as staging, scratch_dir(output, "gguf-src") as work:
        fixes = prepare_gguf_source(source, work)
        for fix in fixes:
            log.info("fix applied: %s", fix["change"])
        outputs = {"text": staging / text_file, "mmproj": staging / mmproj_file}
        timings = {
            "convert_s": round(run_gguf_converter(converter, work, outputs, outtype=quantization, model_name=name), 2)
        }
        # The backend builds the training prompt with the transformers processor: ship its files.
        copied = copy_tokenizer_files(source, staging)
        shutil.copy2(source / "config.json", staging / "config.json")
        files = {}
        for role, fname in (("text", text_file), ("mmproj", mmproj_file)):
            path = staging / fname
            files[role] = {"name": fname, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        manifest: dict[str, Any] = {
            "what": "GGUF export (llama.cpp convert_hf_to_gguf.py: text model + mmproj)",
            "source": str(source.resolve()),
            "source_merge_manifest": merge_manifest,
            "quantization": quantization,
            "files": files,
            "frame_layout": frame_layout,
            "fixes_applied": fixes,
            "source_had_flat_weight_names": bool(flat_before),
            "vocabulary": vocabulary(source),
            "tokenizer_files": sorted(copied) if copied else [n for n in TOKENIZER_FILES if (staging / n).is_file()],
            "converter": {
                **converter_info(converter),
                "command": "python convert_hf_to_gguf.py SRC --outfile F --outtype Q --model-name N [--mmproj] "
                "(subprocess, HF_HUB_OFFLINE=1)",
            },
            "image_preprocessing": "resize every frame like the HF processor (stretch to "
            f"{_image_size(source)}, PIL resample) before llama.cpp: its Gemma 3 preprocessing letterboxes",
            "created": now_iso(),
            "timings": timings,
            "versions": package_versions(),
            "verification": {"ran": False},
        }
        atomic_write_json(staging / GGUF_MANIFEST, manifest)  # the backend finds its files through it
        if verify:
            verification = verify_gguf(
                source,
                staging,
                samples,
                quantization=quantization,
                n_logit_samples=min(n_logit_samples, len(samples)),
                frame_layout=frame_layout,
            )
            verification["samples_source"] = samples_source
            manifest["verification"] = verification
            atomic_write_json(staging / GGUF_MANIFEST, manifest)
    return manifest


def _image_size(source: Path) -> str:
    processor = read_json(source / "processor_config.json") or {}
    size = (processor.get("image_processor") or processor).get("size") or (
        read_json(source / "preprocessor_config.json") or {}
    ).get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        return f"{size['width']}x{size['height']}"
    return "the processor's square size"
