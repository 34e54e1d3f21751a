#!/usr/bin/env python
"""Check the W&B sweep definition against the training script's flags (offline) and create the sweep.

Thin wrapper: the same command as `pokemon-gemma-sweeps` (logic: pokemon_gemma/cli/sweeps.py).
"""

from pokemon_gemma.cli.sweeps import main

if __name__ == "__main__":
    raise SystemExit(main())
