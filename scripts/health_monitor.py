#!/usr/bin/env python
"""Watch the inference server: polls /health, /ready, /metrics and a real /v1/predict probe every

Thin wrapper: the same command as `pokemon-gemma-monitor` (logic: pokemon_gemma/cli/monitor.py).
"""

from pokemon_gemma.cli.monitor import main

if __name__ == "__main__":
    raise SystemExit(main())
