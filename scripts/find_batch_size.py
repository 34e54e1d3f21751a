#!/usr/bin/env python
"""Find the largest micro-batch that trains by running real training steps on the dataset's longest

Thin wrapper: the same command as `pokemon-gemma-batch-size` (logic: pokemon_gemma/cli/batch_size.py).
"""

from pokemon_gemma.cli.batch_size import main

if __name__ == "__main__":
    raise SystemExit(main())
