#!/usr/bin/env python
"""Serve the model over HTTP: POST /v1/predict, POST /v1/chat/completions (OpenAI-compatible),
GET /health, /ready, /metrics. Binds 127.0.0.1 by default."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokemon_gemma.serve.server import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
