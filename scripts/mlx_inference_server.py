#!/usr/bin/env python
"""The inference server with the MLX backend on an exported MLX folder:
`MODEL_PATH=models/pokemon-gemma-mlx python scripts/mlx_inference_server.py`
(MODEL_PATH, HOST, PORT from the environment or .env; every inference_server.py flag works here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokemon_gemma.serve.server import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(default_backend="mlx", description=__doc__))
