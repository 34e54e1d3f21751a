#!/usr/bin/env python
"""DAgger rounds (play -> relabel -> retrain) beside equal-budget behaviour cloning, measured closed loop.

Thin wrapper: the same command as `pokemon-gemma-dagger` (logic: pokemon_gemma/cli/dagger.py).
"""

from pokemon_gemma.cli.dagger import main

if __name__ == "__main__":
    raise SystemExit(main())
