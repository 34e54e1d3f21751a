#!/usr/bin/env python
"""Fine-tune Gemma 3 on 4-frame Pokemon windows (LoRA / QLoRA / full) with a hand-written accelerate loop.

Run directly, or through `accelerate launch` (train_gemma3.sh does). Every flag defaults to `.env`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pokemon_gemma.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
