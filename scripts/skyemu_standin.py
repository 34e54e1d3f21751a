#!/usr/bin/env python
"""Serve the demo world with SkyEmu's HTTP Control Server API, so the SkyEmu harness runs without the emulator.

Thin wrapper: the same command as `pokemon-gemma-skyemu-standin` (logic: pokemon_gemma/cli/skyemu_standin.py).
"""

from pokemon_gemma.cli.skyemu_standin import main

if __name__ == "__main__":
    raise SystemExit(main())
