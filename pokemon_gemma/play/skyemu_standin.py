"""A SkyEmu HTTP Control Server stand-in backed by the demo world, so the emulator harness runs end to
end over real HTTP without the emulator or a ROM.

Same endpoints and answers as SkyEmu for what the harness uses: `/ping` -> `pong`, `/status` -> JSON
(SkyEmu's keys, plus a `demo` block with the world's state for tests and people), `/screen?format=png`
(or jpg/bmp) -> the frame DemoWorldEnv renders, `/input?<Key>=1|0` -> `ok`, `/step?frames=N` -> `ok`,
`/run` -> `ok`; `/ready` -> `ok` for launchers. A key going from released to held is one press of the
demo button with that SkyEmu name, applied at the next `/step` (holding a key does not repeat it).
The world keeps going after `goals` goals (new goals keep appearing); `goals` only sets when the
`demo` block reports the episode as terminated.
"""

from __future__ import annotations

import io
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from PIL import Image

from ..dataset import BUTTONS
from ..demo import png_bytes
from .env import DemoWorldEnv
from .skyemu import SKYEMU_KEYS

KEY_TO_BUTTON = {key: button for button, key in SKYEMU_KEYS.items()}
# The inputs SkyEmu lists in /status (its docs' example), all released at start.
STATUS_INPUTS = (
    "A",
    "B",
    "X",
    "Y",
    "Up",
    "Down",
    "Left",
    "Right",
    "L",
    "R",
    "Start",
    "Select",
    "Capture State 0",
    "Restore State 0",
    "Reset Game",
    "Turbo A",
    "Turbo B",
)
IMAGE_FORMATS = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp"}


class StandIn:
    """The emulated state: a demo world, the held inputs and the presses waiting for the next /step."""

    def __init__(self, seed: int = 0, goals: int = 3, **env_kwargs):
        self.seed, self.goals = seed, goals
        self.env = DemoWorldEnv(goals_per_episode=goals, max_steps=10**9, **env_kwargs)
        self.frame, self.info = self.env.reset(seed=seed)
        self.inputs = {name: 0.0 for name in STATUS_INPUTS}
        self.pending: list[str] = []
        self.frames = 0
        self.presses = 0
        self.lock = threading.Lock()

    def handle(self, path: str, query: list[tuple[str, str]]) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) for one request."""
        with self.lock:
            if path == "/ping":
                return _text("pong")
            if path in ("/run", "/ready"):
                return _text("ok")
            if path == "/status":
                return HTTPStatus.OK, "application/json", json.dumps(self.status(), indent=2).encode()
            if path == "/screen":
                fmt = dict(query).get("format", "png").lower()
                if fmt not in IMAGE_FORMATS:
                    return _text(f"unsupported format {fmt!r}", HTTPStatus.BAD_REQUEST)
                return HTTPStatus.OK, IMAGE_FORMATS[fmt], self.image(fmt)
            if path == "/input":
                for name, value in query:
                    try:
                        held = float(value) > 0.5
                    except ValueError:
                        return _text(f"bad value {value!r} for input {name!r}", HTTPStatus.BAD_REQUEST)
                    if held and self.inputs.get(name, 0.0) <= 0.5 and name in KEY_TO_BUTTON:
                        self.pending.append(KEY_TO_BUTTON[name])
                    self.inputs[name] = 1.0 if held else 0.0
                return _text("ok")
            if path == "/step":
                try:
                    frames = int(dict(query).get("frames", "1"))
                except ValueError:
                    return _text("frames must be an integer", HTTPStatus.BAD_REQUEST)
                for button in self.pending:
                    self.frame, _, _, _, self.info = self.env.step(BUTTONS.index(button))
                    self.presses += 1
                self.pending.clear()
                self.frames += max(frames, 0)
                return _text("ok")
            return _text(f"unknown command {path}", HTTPStatus.NOT_FOUND)

    def image(self, fmt: str) -> bytes:
        if fmt == "png":
            return png_bytes(self.frame)
        buf = io.BytesIO()
        Image.fromarray(self.frame, "RGB").save(buf, format={"jpg": "JPEG", "bmp": "BMP"}[fmt])
        return buf.getvalue()

    def status(self) -> dict:
        info = self.info
        return {
            "emulator": "pokemon-gemma demo-world SkyEmu stand-in",
            "run-mode": "PAUSE",
            "rom-loaded": True,
            "rom-path": f"demo-world:seed={self.seed}",
            "save-path": "",
            "inputs": dict(self.inputs),
            "demo": {
                "seed": self.seed,
                "presses": self.presses,
                "frames": self.frames,
                "goals_done": info["goals_done"],
                "terminated": info["goals_done"] >= self.goals,
                "expert_button": info["expert_button"],
                "player": info["player"],
                "goal": info["goal"],
                "goal_sentence": info["goal_sentence"],
            },
        }


def _text(body: str, status: int = HTTPStatus.OK) -> tuple[int, str, bytes]:
    return status, "text/plain", body.encode()


def make_server(host: str = "127.0.0.1", port: int = 8080, **standin_kwargs) -> ThreadingHTTPServer:
    """A threaded HTTP server answering like SkyEmu; `server.standin` is the world behind it."""
    standin = StandIn(**standin_kwargs)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlsplit(self.path)
            status, ctype, body = standin.handle(url.path, parse_qsl(url.query, keep_blank_values=True))
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except ConnectionError:  # the client went away (timed out): nothing to answer
                pass

        def log_message(self, format, *args):  # quiet: one line per request would drown the player's output
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.standin = standin
    return server


__all__ = ["KEY_TO_BUTTON", "StandIn", "make_server"]
