#!/usr/bin/env python
"""Serve the model over HTTP (torch backend by default).

Thin wrapper: the same command as `pokemon-gemma-serve` (logic: pokemon_gemma/serve/server.py).
"""

from pokemon_gemma.serve.server import main

if __name__ == "__main__":
    raise SystemExit(main())
