#!/usr/bin/env python
"""Play the demo world or a SkyEmu emulator with a model (and baselines), with a closed-loop report.

Thin wrapper: the same command as `pokemon-gemma-play` (logic: pokemon_gemma/cli/play.py).
"""

from pokemon_gemma.cli.play import main

if __name__ == "__main__":
    raise SystemExit(main())
