#!/usr/bin/env python
"""Build a tiny random Gemma 3 (model + tokenizer + processor) that loads like a hub id.

Thin wrapper: the same command as `pokemon-gemma-tiny` (logic: pokemon_gemma/cli/tiny.py).
"""

from pokemon_gemma.cli.tiny import main

if __name__ == "__main__":
    raise SystemExit(main())
