"""DAgger: the model plays the demo world, a labeler relabels every state it visited, the windows join
the training data and training continues from the current adapter; R rounds, each evaluated closed
loop (play on held-out seeds) and offline (the test split), beside equal-budget behaviour cloning
(the same number of extra windows from the expert's own play, trained for the same steps).

    python scripts/dagger.py --model_path demo_output/run --dataset_dir demo_output/data \\
        --output_dir demo_output/dagger --rounds 3 --episodes_per_round 30

Writes OUTPUT_DIR/round_N/{dagger,bc}/ (recordings, relabelled runs, data, the run, evaluations) and
dagger_report.json/.md/.png. A killed run resumes at the first unfinished step. Labelers for real games:
--labeler command:CMD (JSON request on stdin: {"frames": [4 paths], "goal", "turn", "session_id"};
a button on stdout) or url:URL (the same JSON POSTed); a failed or invalid answer leaves that window
unlabelled and counted. Exit codes: 0 done, 1 a step failed, 2 bad options.
"""

import argparse
import sys

from pokemon_gemma.config import load_settings_or_exit, setup_logging
from pokemon_gemma.dagger import DaggerConfig, DaggerError, run_dagger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="round 0: a trained LoRA run or adapter folder")
    p.add_argument("--dataset_dir", required=True, help="the converted data it was trained on (train/test.jsonl)")
    p.add_argument("--output_dir", required=True, help="rounds, runs, evaluations and dagger_report.*")
    p.add_argument("--rounds", type=int, default=3, help="DAgger rounds (default 3)")
    p.add_argument("--episodes_per_round", type=int, default=30, help="episodes the model plays per round for data")
    p.add_argument("--max_steps", type=int, default=120, help="presses per episode (default 120)")
    p.add_argument("--goals_per_episode", type=int, default=3, help="goals per episode (default 3)")
    p.add_argument("--epochs_per_round", type=float, default=1.0, help="epochs over each round's training set")
    p.add_argument("--eval_episodes", type=int, default=50, help="held-out episodes of the closed-loop evaluation")
    p.add_argument("--eval_seed", type=int, default=100_000, help="first seed of the evaluation episodes")
    p.add_argument("--play_seed", type=int, default=0, help="round r plays seeds play_seed + 1000 r + k")
    p.add_argument("--labeler", default="expert", help="expert | command:CMD | url:URL (default: expert)")
    p.add_argument(
        "--mix",
        type=float,
        default=0.5,
        help="share of original training windows in each round's training set (default 0.5)",
    )
    p.add_argument(
        "--no_bc", dest="compare_bc", action="store_false", help="skip the equal-budget behaviour-cloning chain"
    )
    p.add_argument(
        "--unstick",
        action="store_true",
        help="play (data and evaluation) with the unstick rule of scripts/play.py; default: the model's own "
        "top button every press (its mistakes, loops included, are what DAgger learns from); the other "
        "setting is evaluated too",
    )
    p.add_argument("--max_eval_samples", type=int, default=0, help="offline evaluation on the first N test samples")
    p.add_argument("--learning_rate", type=float, default=None, help="default: the round-0 run's")
    p.add_argument("--batch_size", type=int, default=None, help="default: the round-0 run's")
    p.add_argument("--grad_accum", type=int, default=None, help="default: the round-0 run's")
    p.add_argument("--dataloader_workers", type=int, default=None, help="default: the round-0 run's")
    return p


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    args = build_parser().parse_args(argv)
    setup_logging(settings)
    overrides = {
        k: getattr(args, k)
        for k in ("learning_rate", "batch_size", "grad_accum", "dataloader_workers")
        if getattr(args, k) is not None
    }
    cfg = DaggerConfig(
        model_path=args.model_path,
        dataset_dir=args.dataset_dir,
        output_dir=args.output_dir,
        rounds=args.rounds,
        episodes_per_round=args.episodes_per_round,
        max_steps=args.max_steps,
        goals_per_episode=args.goals_per_episode,
        epochs_per_round=args.epochs_per_round,
        eval_episodes=args.eval_episodes,
        eval_seed=args.eval_seed,
        play_seed=args.play_seed,
        labeler=args.labeler,
        mix=args.mix,
        compare_bc=args.compare_bc,
        unstick=args.unstick,
        max_eval_samples=args.max_eval_samples,
        train_overrides=overrides,
    )
    try:
        run_dagger(cfg)
    except DaggerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(f"report: {args.output_dir}/dagger_report.md")
    return 0
