#!/usr/bin/env python
"""Export a merged Gemma 3 folder to Apple MLX with mlx-vlm (vision tower kept), verified against PyTorch.

Thin wrapper: the same command as `pokemon-gemma-export-mlx` (logic: pokemon_gemma/cli/export_mlx.py).
"""

from pokemon_gemma.cli.export_mlx import main

if __name__ == "__main__":
    raise SystemExit(main())
