"""Evaluate a model's next-button predictions on a JSONL split against simple baselines.

Writes OUTPUT_DIR/eval_report.json (metrics, per-button scores, confusion matrix, accuracy per
scene context, latency, baselines), eval_report.md, predictions.jsonl, confusion_matrix.png and
accuracy_by_context.png. The model may be a hub id or folder (base or merged), a LoRA adapter
folder (its base is loaded), an MLX export (folder with export_manifest.json) or a GGUF export
(folder with gguf_manifest.json, scored with llama.cpp).

    python scripts/evaluate.py --model_name models/pokemon-gemma-lora --dataset_path training_data/test.jsonl \\
        --output_dir eval/lora
    python scripts/evaluate.py --compare eval/lora eval/merged eval/mlx eval/gguf
"""

import argparse
import sys
from pathlib import Path

from pokemon_gemma.config import add_settings_args, load_settings_or_exit, setup_logging


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(parser, settings, ["model_name"])
    parser.add_argument(
        "--adapter_path",
        default=None,
        help="LoRA adapter folder applied on top of --model_name (not needed when --model_name "
        "is itself an adapter folder: its base model is read from adapter_config.json)",
    )
    parser.add_argument(
        "--dataset_path",
        default=settings.test_dataset_path,
        help=f"JSONL split to evaluate (env TEST_DATASET_PATH; default: {settings.test_dataset_path!r})",
    )
    parser.add_argument(
        "--output_dir", default="eval", help="folder for the report, predictions and PNGs (default: eval)"
    )
    parser.add_argument(
        "--mode",
        choices=("score", "generate"),
        default="score",
        help="score: the most likely of the 8 full answers (gives probabilities); "
        "generate: greedy JSON answer, parsed (counts invalid JSON / invalid buttons)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="samples per model call: score mode scores them in one prompt pass and one answer pass, "
        "generate mode generates them together (left-padded)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument(
        "--blank_frames",
        action="store_true",
        help="replace every frame with a black image of the same size (does the model read pixels?)",
    )
    parser.add_argument(
        "--train_dataset_path",
        default=None,
        help="training JSONL: the majority baseline uses its most common button (else this set's)",
    )
    parser.add_argument(
        "--frame_layout",
        choices=("images", "grid"),
        default=None,
        help="4 images or one 2x2 grid; must match training (default: what the model folder "
        "records in run_config.json, merge_manifest.json or export_manifest.json, else env "
        f"FRAME_LAYOUT = {settings.frame_layout!r})",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "mlx", "gguf"),
        default="auto",
        help="auto: mlx when the model folder has export_manifest.json, gguf (llama.cpp) when it has "
        "gguf_manifest.json, else torch",
    )
    add_settings_args(parser, settings, ["mixed_precision"])
    parser.add_argument("--max_new_tokens", type=int, default=96, help="generation budget in generate mode")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="EVAL_DIR",
        help="print one side-by-side table of these evaluation folders and exit (evaluates nothing)",
    )
    return parser


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    from pokemon_gemma import evaluate as ev

    try:
        if args.compare:
            print(ev.compare_table(args.compare))
            return 0
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            parser.error("--batch_size and --limit must be at least 1")
        setup_logging(settings)
        from pokemon_gemma.distributed import precision_for

        cfg = ev.EvalConfig(
            model_name=args.model_name,
            adapter_path=args.adapter_path,
            dataset_path=args.dataset_path,
            output_dir=args.output_dir,
            mode=args.mode,
            limit=args.limit,
            blank_frames=args.blank_frames,
            train_dataset_path=args.train_dataset_path,
            frame_layout=args.frame_layout,
            default_frame_layout=settings.frame_layout,
            backend=args.backend,
            precision=precision_for(args.mixed_precision)[0],  # same resolution as training
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        ev.load_eval_records(cfg)  # fail on bad data before spending minutes loading a model
        report = ev.evaluate(cfg, progress=not args.no_progress, token=settings.hub_token)
    except ev.EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    b = report["baselines"]
    print(
        f"accuracy {report['accuracy']:.3f} (macro F1 {report['macro_f1']:.3f}) on {report['n']} samples; "
        f"majority {b['majority']['accuracy']:.3f}, repeat-last {b['repeat_last']['accuracy']:.3f}, "
        f"uniform {b['uniform_random']['accuracy']:.3f}"
    )
    print(f"report: {Path(args.output_dir) / ev.REPORT_MD} (JSON: {Path(args.output_dir) / ev.REPORT_JSON})")
    return 0
