"""Check a dataset, the token budget and the environment before spending GPU time.

Prints a table, writes a JSON report, exits 1 on any error (warnings are allowed).
Example: python scripts/validate_training.py --dataset_path training_data/train.jsonl --output validation_report.json
"""

import argparse
import json
from pathlib import Path

from pokemon_gemma.config import (
    add_settings_args,
    load_settings_or_exit,
    mask_secrets,
    secret_values,
    settings_from_args,
    setup_logging,
)

SETTINGS_FLAGS = [
    "dataset_path",
    "model_name",
    "max_seq_length",
    "frame_layout",
    "image_tokens",
    "batch_size",
    "use_peft",
    "use_qlora",
    "gradient_checkpointing",
    "mixed_precision",
    "lora_r",
    "output_dir",
]


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env_file", default=".env", help="settings file read for defaults (default: .env)")
    add_settings_args(parser, settings, SETTINGS_FLAGS)
    # Not the EVAL/TEST_DATASET_PATH settings: a stale default from another dataset would make the
    # session-overlap check compare unrelated files. The siblings of --dataset_path are what belongs.
    parser.add_argument(
        "--eval_dataset_path",
        default=None,
        help="validation JSONL (default: val.jsonl beside --dataset_path, when it exists)",
    )
    parser.add_argument(
        "--test_dataset_path",
        default=None,
        help="test JSONL (default: test.jsonl beside --dataset_path, when it exists)",
    )
    parser.add_argument(
        "--split_dir",
        default=None,
        help="folder with train.jsonl [val.jsonl test.jsonl]; replaces the three path flags",
    )
    parser.add_argument(
        "--encode_samples",
        type=int,
        default=8,
        help="the N longest samples are fully encoded (images too) by the training collator "
        "(over-long ones always are) (default: 8)",
    )
    parser.add_argument(
        "--output",
        default="validation_report.json",
        help="report JSON; a PNG of labels and token lengths goes beside it (default: validation_report.json)",
    )
    return parser


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env_file", default=".env")
    settings = load_settings_or_exit(pre.parse_known_args(argv)[0].env_file)
    args = build_parser(settings).parse_args(argv)
    s = settings_from_args(settings, args)
    setup_logging(s)

    from pokemon_gemma.fileio import atomic_write_text
    from pokemon_gemma.validate import print_report, split_files, validate

    files = split_files(s.dataset_path, args.eval_dataset_path, args.test_dataset_path, args.split_dir)
    report = validate(s, files, encode_samples=args.encode_samples)
    secrets = secret_values(s)
    for issue in report.issues:  # belt and braces: no message may carry a secret value
        issue.message, issue.where = mask_secrets(issue.message, secrets), mask_secrets(issue.where, secrets)
    text = json.dumps(report.to_dict(), indent=2, default=str) + "\n"
    for secret in secrets:  # values only: keys such as "tokens" are not secrets
        text = text.replace(secret, "***")
    atomic_write_text(args.output, text)
    from pokemon_gemma.plots import validation_png

    png = validation_png(
        report.data.get("label_distribution", {}),
        report.token_lengths,
        s.max_seq_length,
        Path(args.output).with_suffix(".png"),
    )
    print_report(report)
    n_err = sum(i.level == "error" for i in report.issues)
    n_warn = len(report.issues) - n_err
    print(
        f"{'FAILED' if n_err else 'OK'}: {n_err} error(s), {n_warn} warning(s); "
        f"report written to {args.output} and {png}"
    )
    return 1 if n_err else 0
