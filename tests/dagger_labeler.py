"""A test labeler for real-game DAgger: reads the JSON request on stdin, prints a button. The button is
a function of the last frame's bytes (so the command and the url labeler must agree); turns divisible
by 5 crash (exit 1) and turns divisible by 7 answer "jump" (an invalid button)."""

import hashlib
import json
import sys
from pathlib import Path

BUTTONS = ("up", "down", "left", "right", "a", "b")


def button_for(frame: str | Path) -> str:
    return BUTTONS[hashlib.sha256(Path(frame).read_bytes()).digest()[0] % len(BUTTONS)]


def answer(request: dict) -> tuple[int, str]:
    """(exit status, stdout) for a request."""
    if request["turn"] % 5 == 0:
        return 1, ""
    if request["turn"] % 7 == 0:
        return 0, "jump"
    return 0, json.dumps({"button": button_for(request["frames"][-1])})


if __name__ == "__main__":
    status, out = answer(json.loads(sys.stdin.read()))
    print(out)
    raise SystemExit(status)
