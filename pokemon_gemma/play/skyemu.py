"""The SkyEmu emulator over its HTTP Control Server, as Eevee drives it, and a Gymnasium env on top.

Endpoints used (SkyEmu docs/HTTP_CONTROL_SERVER.md): `/ping` -> `pong`, `/status` -> JSON,
`/screen?format=png` -> PNG, `/input?<Key>=1|0` -> `ok`, `/step?frames=N` -> `ok`, `/load?path=` -> `ok`.
Key names are SkyEmu's (Eevee's mapping): Up Down Left Right A B Start Select. A press follows Eevee's
timing (hold 0.2 s, 0.2 s between presses) in emulated frames: key down, step 12 frames, key up, step
12 frames, so a press takes the same game time however fast the emulator runs.

Failures are `SkyEmuError` with a one-line message naming the URL. Connection failures are retried
(a few tries, doubling back-off); a timed-out `/step` is not retried (it may have run: a retry would
hold the key twice as long).
"""

from __future__ import annotations

import io
import time

import gymnasium as gym
import httpx
import numpy as np
from gymnasium import spaces
from PIL import Image

from ..convert import PNG_SIGNATURE
from ..dataset import BUTTONS
from .env import goal_context

SKYEMU_KEYS = {
    "up": "Up",
    "down": "Down",
    "left": "Left",
    "right": "Right",
    "a": "A",
    "b": "B",
    "start": "Start",
    "select": "Select",
}
HOLD_FRAMES = 12  # Eevee holds a key 0.2 s (key_delay) = 12 frames at 60 fps
RELEASE_FRAMES = 12  # and waits 0.2 s before the next press
DEFAULT_URL = "http://127.0.0.1:8080"
FIX_UNREACHABLE = "start SkyEmu with the HTTP Control Server enabled on that port, or pass its URL"


class SkyEmuError(RuntimeError):
    """The emulator is unreachable or answered something unexpected (one-line message naming the URL)."""


class SkyEmuClient:
    """`client.press("up"); frame = client.screen()` against a running SkyEmu (or the stand-in)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        hold_frames: int = HOLD_FRAMES,
        release_frames: int = RELEASE_FRAMES,
    ):
        self.url = url.rstrip("/")
        self.retries, self.backoff_s = max(1, retries), backoff_s
        self.hold_frames, self.release_frames = hold_frames, release_frames
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SkyEmuClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- endpoints

    def ping(self) -> None:
        self._expect("/ping", None, "pong")

    def status(self) -> dict:
        response = self._get("/status")
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise SkyEmuError(
                f"bad answer from {response.request.url}: not a JSON object ({_snippet(response)}) "
                f"(is SkyEmu's HTTP Control Server on that port?)"
            )
        return data

    def screen_png(self) -> bytes:
        response = self._get("/screen", {"format": "png"})
        if not response.content.startswith(PNG_SIGNATURE):
            raise SkyEmuError(
                f"non-PNG screen from {response.request.url}: {len(response.content)} bytes "
                f"({_snippet(response)}) (is a ROM loaded? is this SkyEmu?)"
            )
        return response.content

    def screen(self) -> np.ndarray:
        """The current screen as HxWx3 uint8 RGB."""
        data = self.screen_png()
        try:
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as exc:
            raise SkyEmuError(
                f"non-PNG screen from {self.url}/screen?format=png: does not decode ({exc}) "
                f"(is a ROM loaded? is this SkyEmu?)"
            ) from None

    def set_input(self, keys: dict[str, int]) -> None:
        """Hold (1) or release (0) inputs by SkyEmu name, e.g. {"A": 1}; they stay until set again."""
        self._expect("/input", {k: int(v) for k, v in keys.items()}, "ok")

    def step(self, frames: int = 1) -> None:
        self._expect("/step", {"frames": int(frames)}, "ok", idempotent=False)

    def load_state(self, path: str) -> None:
        self._expect("/load", {"path": path}, "ok")

    def press(self, button: str) -> None:
        """One button press with Eevee's timing: key down, hold, key up, pause (in emulated frames)."""
        key = SKYEMU_KEYS.get(button)
        if key is None:
            raise ValueError(f"unknown button {button!r} (one of {', '.join(BUTTONS)})")
        self.set_input({key: 1})
        self.step(self.hold_frames)
        self.set_input({key: 0})
        self.step(self.release_frames)

    # -------------------------------------------------------------------- HTTP

    def _get(self, path: str, params: dict | None = None, idempotent: bool = True) -> httpx.Response:
        url = str(self._http.build_request("GET", path, params=params).url)
        error = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.get(path, params=params)
            except httpx.TimeoutException as exc:
                error = f"timed out ({type(exc).__name__})"
                if not idempotent and not isinstance(exc, httpx.ConnectTimeout):
                    break
                continue
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.status_code != 200:
                raise SkyEmuError(
                    f"bad answer from {url}: HTTP {response.status_code} ({_snippet(response)}) "
                    f"(an older SkyEmu, or another server on that port?)"
                )
            return response
        tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
        raise SkyEmuError(f"SkyEmu unreachable at {url} after {tries} ({error}) ({FIX_UNREACHABLE})")

    def _expect(self, path: str, params: dict | None, answer: str, idempotent: bool = True) -> None:
        response = self._get(path, params, idempotent)
        if response.text.strip() != answer:
            raise SkyEmuError(
                f"bad answer from {response.request.url}: expected {answer!r}, got {_snippet(response)} "
                f"(is SkyEmu's HTTP Control Server on that port?)"
            )


def _snippet(response: httpx.Response, n: int = 60) -> str:
    ctype = response.headers.get("content-type", "?")
    if ctype.startswith(("text/", "application/json")):
        text = " ".join(response.text.split())
        return repr(text[:n] + ("..." if len(text) > n else ""))
    return f"content-type {ctype}, starts {response.content[:8]!r}"


class SkyEmuEnv(gym.Env):
    """The emulator as an env with the demo env's shape: obs = the screen (HxWx3 uint8), action = an index
    into BUTTONS. The game gives no reward or success signal: reward is 0, `terminated` is never set,
    `truncated` comes at `max_steps`. `info`: step, button (the last press), goal_sentence, context."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        url: str = DEFAULT_URL,
        goal: str = "",
        max_steps: int = 120,
        state_path: str | None = None,
        render_mode: str | None = None,
        client: SkyEmuClient | None = None,
        **client_kwargs,
    ):
        self.client = client or SkyEmuClient(url, **client_kwargs)
        self.goal_sentence, self.max_steps, self.state_path = goal, max_steps, state_path
        self.render_mode = render_mode
        self.client.ping()
        self._frame = self.client.screen()
        self.observation_space = spaces.Box(0, 255, self._frame.shape, np.uint8)
        self.action_space = spaces.Discrete(len(BUTTONS))
        self._step = 0

    @property
    def url(self) -> str:
        return self.client.url

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Loads `state_path` (a SkyEmu save state) when given; the game itself cannot be reseeded."""
        super().reset(seed=seed)
        if self.state_path:
            self.client.load_state(self.state_path)
        self._step = 0
        self._frame = self.client.screen()
        return self._frame, self._info(None)

    def step(self, action):
        button = BUTTONS[int(action)]
        self.client.press(button)
        self._frame = self.client.screen()
        self._step += 1
        return self._frame, 0.0, False, self._step >= self.max_steps, self._info(button)

    def render(self):
        return self._frame if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        self.client.close()

    def _info(self, button: str | None) -> dict:
        return {
            "step": self._step,
            "button": button,
            "goal_sentence": self.goal_sentence,
            "context": goal_context(self.goal_sentence),
        }


__all__ = ["DEFAULT_URL", "HOLD_FRAMES", "RELEASE_FRAMES", "SKYEMU_KEYS", "SkyEmuClient", "SkyEmuEnv", "SkyEmuError"]
