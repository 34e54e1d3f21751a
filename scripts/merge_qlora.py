#!/usr/bin/env python
"""Merge a LoRA/QLoRA adapter into its base model and save a standalone, verified model folder.

Thin wrapper: the same command as `pokemon-gemma-merge` (logic: pokemon_gemma/cli/merge.py).
"""

from pokemon_gemma.cli.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
