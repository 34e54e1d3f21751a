#!/usr/bin/env python
"""Evaluate a model's next-button predictions on a JSONL split against simple baselines.

Thin wrapper: the same command as `pokemon-gemma-evaluate` (logic: pokemon_gemma/cli/evaluate.py).
"""

from pokemon_gemma.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
