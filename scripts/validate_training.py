#!/usr/bin/env python
"""Check a dataset, the token budget and the environment before spending GPU time.

Thin wrapper: the same command as `pokemon-gemma-validate` (logic: pokemon_gemma/cli/validate.py).
"""

from pokemon_gemma.cli.validate import main

if __name__ == "__main__":
    raise SystemExit(main())
