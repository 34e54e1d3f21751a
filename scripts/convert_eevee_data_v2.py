#!/usr/bin/env python
"""Convert Eevee v1 runs (format V0-V3) into 4-frame JSONL: full, train/val/test (split by session) + summary.json.

Thin wrapper: the same command as `pokemon-gemma-convert` (logic: pokemon_gemma/cli/convert.py).
"""

from pokemon_gemma.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
