#!/usr/bin/env python
"""Serve an exported MLX folder over HTTP (MLX backend by default).

Thin wrapper: the same command as `pokemon-gemma-serve-mlx` (logic: pokemon_gemma/serve/server.py).
"""

from pokemon_gemma.serve.server import main_mlx

if __name__ == "__main__":
    raise SystemExit(main_mlx())
