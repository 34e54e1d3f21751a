"""Generate procedural demo sessions in the Eevee v1 V3 run format (the default dataset of demo.sh).

Writes OUTPUT_DIR/runs/session_<YYYYMMDD_HHMMSS>/{session_data.json, sshots/step_NNNN_grid.png,
step_NNNN_visual_analysis.txt} and OUTPUT_DIR/demo_manifest.json (flags, label counts, baselines).
The same --seed and flags give byte-identical files. Convert the result with
scripts/convert_eevee_data_v2.py --eevee_data_dir OUTPUT_DIR.
"""

import argparse
import sys
from pathlib import Path

from pokemon_gemma.demo import DemoOutputError, write_demo_sessions
from pokemon_gemma.progress import progress as progress_bar


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write; sessions go to OUTPUT_DIR/runs/")
    parser.add_argument("--sessions", type=int, default=200, help="number of sessions (one world each; default 200)")
    parser.add_argument(
        "--seed", type=int, default=0, help="generation seed; same seed + flags = same bytes (default 0)"
    )
    parser.add_argument("--min_turns", type=int, default=8, help="fewest turns per session, >= 4 (default 8)")
    parser.add_argument("--max_turns", type=int, default=16, help="most turns per session (default 16)")
    parser.add_argument(
        "--dialogue_rate",
        type=float,
        default=0.08,
        help="chance per free turn that an unrelated message box interrupts the walk (default 0.08)",
    )
    parser.add_argument(
        "--question_rate",
        type=float,
        default=0.7,
        help="chance that a goal's dialogue ends with a YES/NO question answered with b (default 0.7)",
    )
    parser.add_argument(
        "--paths",
        type=int,
        default=0,
        help="up to this many straight path strips per world (walkable; default 0: plain grass learns fastest)",
    )
    parser.add_argument(
        "--world_size",
        type=int,
        default=12,
        help="world width and height in tiles, >= 8; above 8 the camera follows the player, who stays "
        "on screen tile (4,4) like in the real game (default 12)",
    )
    parser.add_argument(
        "--grid_lines",
        action="store_true",
        help="draw the real recordings' light-grey 8x8 tile grid (off by default: clutter for a tiny model)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the sessions of an earlier run of this script in OUTPUT_DIR (nothing else is removed)",
    )
    args = parser.parse_args(argv)
    if args.world_size < 8:
        parser.error("--world_size must be at least 8 (the screen is 8x8 tiles)")
    if args.paths < 0:
        parser.error("--paths must be >= 0")
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if not 4 <= args.min_turns <= args.max_turns:
        parser.error("need 4 <= --min_turns <= --max_turns (a training window is 4 turns)")
    for name in ("dialogue_rate", "question_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name} must be between 0 and 1")
    try:
        summary = write_demo_sessions(
            args.output_dir,
            args.sessions,
            seed=args.seed,
            min_turns=args.min_turns,
            max_turns=args.max_turns,
            dialogue_rate=args.dialogue_rate,
            question_rate=args.question_rate,
            paths=args.paths,
            grid_lines=args.grid_lines,
            world_size=args.world_size,
            overwrite=args.overwrite,
            progress=lambda it: progress_bar(it, desc="demo sessions", unit="session"),
        )
    except DemoOutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.output_dir}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 1
    labels = ", ".join(f"{b} {n}" for b, n in summary["labels"].items())
    print(f"wrote {args.sessions} sessions ({summary['turns']} turns) to {Path(args.output_dir) / 'runs'}")
    print(
        f"labels: {labels}; majority {summary['majority_share']:.1%}, "
        f"repeat-last {summary['repeat_last_share']:.1%} (per turn)"
    )
    return 0
