"""Policies: what presses the next button. The interface model policies plug into, and the non-model ones.

    policy.reset(seed)                      # before each episode (seed: the episode's, or None)
    policy.act(frames, context, info) -> str

`frames`: the last 4 observations (HxWx3 uint8 arrays), oldest first; at the start of an episode the
first frame is repeated (the converter pads short windows the same way). `context`: the text training
put beside the frames (`env.goal_context`). `info`: the env's info plus `last_button` (the loop's
previous press, None at the start). The answer should be one of `BUTTONS`; anything else is counted as
an invalid answer by the loop and asked again once. A policy may set `last_reasoning` and
`last_observations` (str) in `act`: the recorder writes them as the turn's reasoning and observations.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..backends.frame_cache import FrameCache
from ..dataset import BUTTONS, QUESTION, parse_output
from ..errors import first_line
from ..fileio import iter_jsonl


class PolicyError(RuntimeError):
    """A policy that cannot act here (one-line message saying why and what to do)."""


class Policy:
    """Base class: subclasses set `name` and implement `act`."""

    name = "policy"
    last_reasoning = ""
    last_observations = ""

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
        # Recorded like the demo sessions' expert turns, so its recordings train like them.
        self.last_reasoning = info.get("expert_reasoning", "")
        self.last_observations = info.get("expert_observations", "")
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


def frame_key(frame: np.ndarray) -> str:
    """A frame's identity for the feature cache (the window slides by one frame per press)."""
    return hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).hexdigest()


class ScoredPolicy(Policy):
    """A policy that ranks the 8 buttons (a model's answer probabilities) and presses the best one.

    `unstick`: a button already pressed on this exact screen earlier in the episode is not pressed
    there again; the best-ranked button not yet tried on it is. In a world where the screen shows the
    whole state, seeing a screen again means the earlier press changed nothing (a wall, `a` facing
    nothing) or led round in a cycle; a deterministic policy would repeat it forever (measured on the
    demo model: stuck loops ended 19 of 50 episodes, cycles most of the rest). The ranking is still the
    model's own; once every button was tried on a screen, its list starts over."""

    def __init__(self, unstick: bool = True):
        self.unstick = unstick
        self._tried: dict[str, list[str]] = {}

    def reset(self, seed=None):
        self._tried = {}

    def probabilities(self, frames: list[np.ndarray], context: str) -> dict[str, float] | str:
        """The 8 buttons' probabilities, or a string (an invalid answer, e.g. an HTTP error)."""
        raise NotImplementedError

    def act(self, frames, context, info):
        probs = self.probabilities(frames, context)
        if isinstance(probs, str):
            return probs
        ranked = sorted(probs, key=probs.get, reverse=True)
        if not self.unstick:
            button = ranked[0]
        else:
            tried = self._tried.setdefault(frame_key(frames[-1]), [])
            if len(tried) == len(ranked):
                tried.clear()
            button = next(b for b in ranked if b not in tried)
            tried.append(button)
        self.last_reasoning = f"p({button})={probs[button]:.3f}" + (
            f" (rank {ranked.index(button) + 1}: tried here before)" if button != ranked[0] else ""
        )
        return button


class ModelPolicy(ScoredPolicy):
    """A model through the backend layer (any folder evaluate.py accepts: adapter, merged, full
    fine-tune, MLX): the most likely of the 8 full answers. Per-frame vision features are cached, so
    each press runs the vision tower on the one new frame only (as the server's session cache does)."""

    name = "model"

    def __init__(self, backend, question: str = QUESTION, cache_frames: int = 16, unstick: bool = True):
        super().__init__(unstick)
        self.backend, self.question = backend, question
        self.cache = FrameCache(cache_frames if backend.supports_features else 0)

    @classmethod
    def load(cls, model_path: str, unstick: bool = True, **backend_kwargs) -> ModelPolicy:
        from ..backends import BackendError, load_backend

        try:
            return cls(load_backend(model_path, **backend_kwargs), unstick=unstick)
        except BackendError as exc:
            raise PolicyError(str(exc)) from None

    def reset(self, seed=None):
        super().reset(seed)
        self.cache = FrameCache(self.cache.max_frames)

    def _features(self, images: list[Image.Image], frames: list[np.ndarray]) -> list[Any] | None:
        if not self.cache.enabled:
            return None
        keys = [frame_key(f) for f in frames]
        missing = {k: im for k, im in zip(keys, images) if self.cache.get(k) is None}
        for key, feature in zip(missing, self.backend.encode_frames(list(missing.values())) if missing else []):
            self.cache.put(key, feature)
        return [self.cache.get(k) for k in keys]

    def probabilities(self, frames, context):
        images = [Image.fromarray(f) for f in frames]
        context = self.backend.fit_context(context, self.question)
        return self.backend.score(images, context, self.question, features=self._features(images, frames)).probabilities


class ServerPolicy(ScoredPolicy):
    """Our inference server over HTTP (POST /v1/predict, score mode) with a `session_id` per episode,
    so the server's frame cache is used. A 4xx/5xx answer is returned as an invalid answer (the loop
    counts it and asks once more); an unreachable server is a one-line PolicyError naming the URL."""

    name = "server"

    def __init__(
        self,
        server_url: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        question: str = QUESTION,
        unstick: bool = True,
    ):
        import httpx

        from ..serve.client import auth_headers

        super().__init__(unstick)
        self.url = server_url.rstrip("/") + "/v1/predict"
        self.client = httpx.Client(timeout=timeout_s, headers=auth_headers(api_key))
        self.question = question
        self.session_id = None

    def reset(self, seed=None):
        super().reset(seed)
        self.session_id = f"play-{uuid.uuid4().hex[:12]}"

    def probabilities(self, frames, context):
        import httpx

        from ..serve.client import encode_image, predict_payload

        payload = predict_payload(
            [encode_image(Image.fromarray(f)) for f in frames], context=context, session_id=self.session_id
        )
        try:
            response = self.client.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            raise PolicyError(f"{self.url}: inference server unreachable ({first_line(exc)})") from None
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:120]}"
        probs = response.json().get("probabilities")
        return probs if isinstance(probs, dict) and set(probs) == set(BUTTONS) else f"no probabilities: {probs!r:.80}"


POLICIES: dict[str, Callable[..., Policy]] = {
    "expert": ExpertPolicy,
    "random": RandomPolicy,
    "repeat_last": RepeatLastPolicy,
    "majority": MajorityPolicy.from_jsonl,
    "model": ModelPolicy.load,
    "server": ServerPolicy,
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
    "ModelPolicy",
    "Policy",
    "ScoredPolicy",
    "PolicyError",
    "RandomPolicy",
    "RepeatLastPolicy",
    "ServerPolicy",
    "make_policy",
]
