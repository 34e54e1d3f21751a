#!/usr/bin/env python
"""Former name of bench/make_random_model.py, kept so `bench/make_random_gemma3.py --size 4b ...` still works.

Write a random-weight folder with the real shapes of Gemma 3 (4b/12b/27b) or Gemma 4 (e2b/e4b); every
flag is make_random_model.py's (see its --help).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
