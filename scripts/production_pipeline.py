#!/usr/bin/env python
"""Take a trained checkpoint to a registered (and optionally served) production model.

Thin wrapper: the same command as `pokemon-gemma-pipeline` (logic: pokemon_gemma/cli/pipeline.py).
"""

from pokemon_gemma.cli.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
