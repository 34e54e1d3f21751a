"""Find the largest micro-batch that trains by running real training steps on the dataset's longest
samples; recommend BATCH_SIZE and GRAD_ACCUM (optionally written into .env).

Example: python scripts/find_batch_size.py --dataset_path training_data/train.jsonl --use_qlora --update_env
"""

import argparse
import sys
from pathlib import Path

from pokemon_gemma.config import add_settings_args, load_settings_or_exit, settings_from_args, setup_logging

SETTINGS_FLAGS = [
    "dataset_path",
    "model_name",
    "use_peft",
    "use_qlora",
    "gradient_checkpointing",
    "max_seq_length",
    "frame_layout",
    "image_tokens",
    "mixed_precision",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
]


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--env_file",
        default=".env",
        help="settings file read for defaults and rewritten by --update_env (default: .env)",
    )
    add_settings_args(parser, settings, SETTINGS_FLAGS)
    parser.add_argument("--max_batch_size", type=int, default=64, help="largest micro-batch tried (default: 64)")
    parser.add_argument(
        "--target_effective_batch",
        type=int,
        default=16,
        help="samples per optimizer step wanted; GRAD_ACCUM = ceil(target / (batch x processes)) (default: 16)",
    )
    parser.add_argument(
        "--max_memory_gb",
        type=float,
        default=None,
        help="memory budget in GiB (default: the GPU's memory, or available RAM on CPU)",
    )
    parser.add_argument(
        "--safety_margin",
        type=float,
        default=0.9,
        help="a size fits when its peak is at most this fraction of the budget (default: 0.9)",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=1,
        help="training processes (GPUs) that each run a micro-batch (default: 1)",
    )
    parser.add_argument(
        "--probe_steps",
        type=int,
        default=3,
        help="optimizer steps per probe; the first is not timed (default: 3, at least 2)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="where to probe (default: auto = cuda, else mps, else cpu)",
    )
    parser.add_argument(
        "--output",
        default="batch_size_results.json",
        help="report JSON; a PNG of memory and throughput per size goes beside it (default: batch_size_results.json)",
    )
    parser.add_argument(
        "--update_env",
        action="store_true",
        help="write BATCH_SIZE and GRAD_ACCUM into --env_file, keeping every other line",
    )
    return parser


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env_file", default=".env")
    env_file = pre.parse_known_args(argv)[0].env_file
    settings = load_settings_or_exit(env_file)
    args = build_parser(settings).parse_args(argv)
    if args.max_batch_size < 1 or args.target_effective_batch < 1 or args.num_processes < 1:
        print("error: --max_batch_size, --target_effective_batch and --num_processes must be >= 1", file=sys.stderr)
        return 2
    if not 0 < args.safety_margin <= 1 or (args.max_memory_gb is not None and args.max_memory_gb <= 0):
        print("error: --safety_margin must be in (0, 1] and --max_memory_gb > 0", file=sys.stderr)
        return 2
    s = settings_from_args(settings, args)
    setup_logging(s)

    from pokemon_gemma.batch_finder import FinderError, find_batch_size, no_fit_message, print_report, update_env_file
    from pokemon_gemma.collate import SampleError
    from pokemon_gemma.dataset import RecordError
    from pokemon_gemma.fileio import JsonlError, atomic_write_json
    from pokemon_gemma.modeling import ModelLoadError

    try:
        report = find_batch_size(
            s,
            max_batch_size=args.max_batch_size,
            target_effective_batch=args.target_effective_batch,
            max_memory_gb=args.max_memory_gb,
            safety_margin=args.safety_margin,
            num_processes=args.num_processes,
            probe_steps=args.probe_steps,
            device=args.device,
        )
    except (FinderError, RecordError, JsonlError, ModelLoadError, SampleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    atomic_write_json(args.output, report)
    from pokemon_gemma.plots import batch_size_png

    rec = report["recommendation"]
    png = batch_size_png(
        report["results"],
        Path(args.output).with_suffix(".png"),
        limit_gb=report["limit_gb"],
        budget_gb=report["budget_gb"],
        recommended=rec["batch_size"] if rec else None,
        title=f"Batch-size probes on {report['device_name']}",
    )
    print_report(report)
    print(f"report written to {args.output} and {png}")
    if rec is None:
        print(f"error: {no_fit_message(report)}", file=sys.stderr)
        return 1
    if args.update_env:
        update_env_file(args.env_file, {"BATCH_SIZE": rec["batch_size"], "GRAD_ACCUM": rec["grad_accum"]})
        print(f"{args.env_file}: BATCH_SIZE={rec['batch_size']} GRAD_ACCUM={rec['grad_accum']}")
    return 0
