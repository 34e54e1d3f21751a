"""Merge a LoRA/QLoRA adapter into its base model and save a standalone, verified model folder.

The base is loaded unquantised in float32 (a QLoRA adapter is never merged into 4-bit weights),
merged with peft's merge_and_unload, and saved in --dtype with the processor, every tokenizer file
the base had (tokenizer.model included) and merge_manifest.json (base id/revision, adapter path and
sha256, dtype, time, package versions, verification). --verify compares the merged model's logits
with the unmerged adapter's on fixed 4-frame samples and exits 1 when they differ by more than a
dtype-appropriate tolerance.

    python scripts/merge_qlora.py --base_model google/gemma-3-4b-it --lora_path models/pokemon-gemma-lora \\
        --output_path models/pokemon-gemma-merged --dtype bf16
"""

import argparse
import sys

from pokemon_gemma.config import load_settings_or_exit, setup_logging


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base_model",
        default=None,
        help="base model id or folder (default: the adapter's base_model_name_or_path, else env "
        f"MODEL_NAME = {settings.model_name!r})",
    )
    parser.add_argument(
        "--lora_path",
        default=settings.output_dir,
        help=f"adapter folder: a run folder, its best/ or a checkpoint-N/ (env OUTPUT_DIR; default: "
        f"{settings.output_dir!r})",
    )
    parser.add_argument(
        "--output_path",
        default=settings.model_path,
        help=f"merged model folder to write (env MODEL_PATH; default: {settings.model_path!r})",
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="dtype of the saved weights; the merge itself runs in float32 (default: bf16)",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare merged vs adapter logits on fixed samples; exit 1 over tolerance (default: on)",
    )
    parser.add_argument(
        "--verify_data",
        default=None,
        help="JSONL whose first records are the verification samples (default: fixed demo samples)",
    )
    parser.add_argument("--verify_samples", type=int, default=3, help="number of verification samples (default: 3)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output_path if it exists")
    return parser


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    if args.verify_samples < 1:
        parser.error("--verify_samples must be at least 1")
    setup_logging(settings)
    from pokemon_gemma.artifacts import ArtifactError, adapter_base_model
    from pokemon_gemma.export import ExportError, merge_lora

    base = args.base_model
    if base is None:
        try:
            base = adapter_base_model(args.lora_path)
        except ArtifactError:  # merge_lora names what is wrong with the adapter folder
            base = settings.model_name
    try:
        manifest = merge_lora(
            base,
            args.lora_path,
            args.output_path,
            dtype=args.dtype,
            verify=args.verify,
            overwrite=args.overwrite,
            n_samples=args.verify_samples,
            verify_data=args.verify_data,
            token=settings.hub_token,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(f"merged {args.lora_path} into {base} -> {args.output_path} ({args.dtype}, {manifest['seconds']} s)")
    v = manifest["verification"]
    if not v.get("ran"):
        print("verification skipped (--no-verify)")
        return 0
    print(
        f"verify: max |logit diff| merged vs adapter = {v['max_abs_logit_diff']:.3g} "
        f"(tolerance {v['tolerance']:.3g}; the adapter moves the base by {v['adapter_effect']:.3g}; "
        f"{v['samples']} samples) -> {'OK' if v['passed'] else 'FAILED'}"
    )
    if not v["passed"]:
        print(
            f"error: {args.output_path}: merged logits differ from the adapter's by {v['max_abs_logit_diff']:.3g} "
            f"(tolerance {v['tolerance']:.3g}, adapter effect {v['adapter_effect']:.3g}; "
            f"see {args.output_path}/merge_manifest.json)",
            file=sys.stderr,
        )
        return 1
    return 0
