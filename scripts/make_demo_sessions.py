#!/usr/bin/env python
"""Generate procedural demo sessions in the Eevee v1 V3 run format (the default dataset of demo.sh).

Thin wrapper: the same command as `pokemon-gemma-demo` (logic: pokemon_gemma/cli/demo.py).
"""

from pokemon_gemma.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
