"""Convert Eevee v1 runs (format V0-V3) into 4-frame JSONL: full, train/val/test (split by session) + summary.json.

Exit codes: 0 converted, 1 nothing could be converted (or --strict found a problem), 2 bad options.
"""

import argparse
import sys
from pathlib import Path

from pokemon_gemma.config import add_settings_args, load_settings_or_exit
from pokemon_gemma.convert import ConvertError, UsageError, convert_corpus, summary_table


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(parser, settings, ["eevee_data_dir"])
    parser.add_argument(
        "--output_dir",
        default=settings.training_data_dir,
        help="folder for pokemon_4frame_dataset_full.jsonl, train/val/test.jsonl, summary.json "
        f"(env TRAINING_DATA_DIR; default: {settings.training_data_dir!r})",
    )
    parser.add_argument(
        "--min_frames",
        type=int,
        default=4,
        help="consecutive recorded turns a window needs (1-4); below 4 the oldest frame is repeated, "
        "so the first turns of a session can be targets (default: 4)",
    )
    parser.add_argument(
        "--val_fraction", type=float, default=0.1, help="fraction of sessions in val.jsonl (default: 0.1)"
    )
    parser.add_argument(
        "--test_fraction", type=float, default=0.1, help="fraction of sessions in test.jsonl (default: 0.1)"
    )
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the per-session split hash (default: 0)")
    parser.add_argument(
        "--max_gap_seconds",
        type=float,
        default=60.0,
        help="largest time between consecutive turns inside a window; <= 0 disables (default: 60)",
    )
    parser.add_argument(
        "--copy_images",
        action="store_true",
        help="copy each used frame once to OUTPUT_DIR/images/<session>/step_NNNN_grid.png and write "
        "paths relative to the JSONL folder (default: absolute paths to the source frames)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes converting sessions (frame checks and copies) in parallel (default: 1)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first problem (bad file, bad frame, session giving no window) with exit 1",
    )
    args = parser.parse_args(argv)

    try:
        summary = convert_corpus(
            args.eevee_data_dir,
            args.output_dir,
            min_frames=args.min_frames,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            max_gap_seconds=args.max_gap_seconds,
            copy_images=args.copy_images,
            workers=args.workers,
            strict=args.strict,
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # writing the outputs failed (disk full, permissions): nothing was replaced
        print(
            f"error: {exc.filename or args.output_dir}: {exc.strerror or exc} (check free disk space and "
            f"permissions of --output_dir)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output file was replaced", file=sys.stderr)
        return 1

    from rich.console import Console

    Console().print(summary_table(summary))
    if summary["windows"]["produced"] == 0:
        print(
            f"error: {args.eevee_data_dir}: no window could be converted (reasons in "
            f"{Path(args.output_dir) / 'summary.json'})",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {summary['windows']['produced']} windows to {args.output_dir}")
    return 0
