#!/usr/bin/env python
"""Fine-tune Gemma 3 on 4-frame Pokemon windows (LoRA / QLoRA / full) with a hand-written accelerate loop.

Run directly, or through `accelerate launch` (train_gemma3.sh does). Every flag defaults to `.env`.
"""

from pokemon_gemma.train import main

if __name__ == "__main__":
    raise SystemExit(main())
