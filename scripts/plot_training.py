#!/usr/bin/env python
"""Plot a training run's curves: RUN_DIR/metrics.jsonl -> RUN_DIR/training_curves.png.

Thin wrapper: the same command as `pokemon-gemma-plot-training` (logic: pokemon_gemma/cli/plot_training.py).
"""

from pokemon_gemma.cli.plot_training import main

if __name__ == "__main__":
    raise SystemExit(main())
