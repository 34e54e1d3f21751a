"""Plot a training run's curves: RUN_DIR/metrics.jsonl -> RUN_DIR/training_curves.png.

Panels: train and validation loss, validation accuracy, learning rate, against the optimizer step.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--run_dir",
        required=True,
        help="training run folder holding metrics.jsonl (one JSON object per logged step: step, "
        "train/loss, lr, and eval/loss, eval/accuracy at eval steps)",
    )
    args = parser.parse_args(argv)
    from pokemon_gemma.plots import PlotError, plot_training_run

    try:
        path = plot_training_run(args.run_dir)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"training curves: {path}")
    return 0
