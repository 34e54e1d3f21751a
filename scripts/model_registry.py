#!/usr/bin/env python
"""Model registry: register, list, show, promote, roll back, delete and export model versions.

Thin wrapper: the same command as `pokemon-gemma-registry` (logic: pokemon_gemma/cli/registry.py).
"""

from pokemon_gemma.cli.registry import main

if __name__ == "__main__":
    raise SystemExit(main())
