"""Policies: what presses the next button. The interface model policies plug into, and the non-model ones.

    policy.reset(seed)                      # before each episode (seed: the episode's, or None)
    policy.act(frames, context, info) -> str

`frames`: the last 4 observations (HxWx3 uint8 arrays), oldest first; at the start of an episode the
first frame is repeated (the converter pads short windows the same way). `context`: the text training
put beside the frames (`env.goal_context`). `info`: the env's info plus `last_button` (the loop's
previous press, None at the start). The answer should be one of `BUTTONS`; anything else is counted as
an invalid answer by the loop and asked again once. A policy may set `last_reasoning` (str) in `act`:
the recorder writes it as the turn's reasoning.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import BUTTONS, parse_output
from ..fileio import iter_jsonl


class PolicyError(RuntimeError):
    """A policy that cannot act here (one-line message saying why and what to do)."""


class Policy:
    """Base class: subclasses set `name` and implement `act`."""

    name = "policy"
    last_reasoning = ""

    def reset(self, seed: int | None = None) -> None:
        """Forget the previous episode; `seed` makes a random policy's episode reproducible."""

    def act(self, frames: list[np.ndarray], context: str, info: dict[str, Any]) -> str:
        raise NotImplementedError


class ExpertPolicy(Policy):
    """The demo world's expert: the button the env's info names (demo world only)."""

    name = "expert"

    def act(self, frames, context, info):
        button = info.get("expert_button")
        if button is None:
            raise PolicyError(
                "the expert policy needs the demo world's info['expert_button'] "
                "(use it with pokemon_gemma/DemoWorld-v0, not the emulator)"
            )
        return button


class RandomPolicy(Policy):
    """Uniform over `buttons` (all 8 by default); seeded per episode from (seed, episode seed)."""

    name = "random"

    def __init__(self, seed: int = 0, buttons: tuple[str, ...] = BUTTONS):
        self.seed, self.buttons = seed, tuple(buttons)
        self.rng = random.Random(f"random-policy:{seed}")

    def reset(self, seed=None):
        self.rng = random.Random(f"random-policy:{self.seed}:{seed}")

    def act(self, frames, context, info):
        return self.rng.choice(self.buttons)


class RepeatLastPolicy(Policy):
    """Presses the loop's previous button again; `first` (default `up`: a move) starts each episode.
    In play this presses one button forever: the floor a model that only copies history would reach."""

    name = "repeat_last"

    def __init__(self, first: str = "up"):
        if first not in BUTTONS:
            raise ValueError(f"first must be one of {', '.join(BUTTONS)}, got {first!r}")
        self.first = first

    def act(self, frames, context, info):
        return info.get("last_button") or self.first


class MajorityPolicy(Policy):
    """Always the training split's most common label (the evaluation's majority baseline)."""

    name = "majority"

    def __init__(self, button: str):
        if button not in BUTTONS:
            raise ValueError(f"button must be one of {', '.join(BUTTONS)}, got {button!r}")
        self.button = button

    @classmethod
    def from_jsonl(cls, path: str | Path) -> MajorityPolicy:
        """From a training split JSONL (e.g. training_data/train.jsonl); ties go to the earlier button in BUTTONS."""
        counts: Counter = Counter()
        for lineno, obj in iter_jsonl(path):
            try:
                counts[parse_output(obj.get("output"))["button"]] += 1
            except ValueError as exc:
                raise PolicyError(f"{path}:{lineno}: output: {exc} (a JSONL written by the converter?)") from None
        if not counts:
            raise PolicyError(f"{path}: no records (pass the converter's train.jsonl)")
        return cls(max(BUTTONS, key=lambda b: (counts[b], -BUTTONS.index(b))))

    def act(self, frames, context, info):
        return self.button


POLICIES: dict[str, Callable[..., Policy]] = {
    "expert": ExpertPolicy,
    "random": RandomPolicy,
    "repeat_last": RepeatLastPolicy,
    "majority": MajorityPolicy.from_jsonl,
}


def make_policy(name: str, **kwargs) -> Policy:
    """`make_policy("random", seed=1)`, `make_policy("majority", path="train.jsonl")`; model policies
    register their factory in POLICIES."""
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")
    return POLICIES[name](**kwargs)


__all__ = [
    "POLICIES",
    "ExpertPolicy",
    "MajorityPolicy",
    "Policy",
    "PolicyError",
    "RandomPolicy",
    "RepeatLastPolicy",
    "make_policy",
]
