#!/usr/bin/env python
"""Export a merged Gemma 3 folder to GGUF (text model + mmproj) with llama.cpp's own converter, verified.

Thin wrapper: the same command as `pokemon-gemma-export-gguf` (logic: pokemon_gemma/cli/export_gguf.py).
"""

from pokemon_gemma.cli.export_gguf import main

if __name__ == "__main__":
    raise SystemExit(main())
