"""Request parsing: every way a request can be wrong becomes a `RequestError` with a 4xx status and a
one-line reason. Frames arrive only as base64 (or `data:` URL) PNG/JPEG bytes; file paths and remote
URLs are refused, never opened."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass

from PIL import Image

from ..dataset import FRAMES_PER_SAMPLE, QUESTION

MODES = ("score", "generate")
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096  # per frame; also keeps PIL's decompression-bomb check from ever firing
MAX_CONTEXT_CHARS = 20_000
MAX_QUESTION_CHARS = 4_000
MAX_SESSION_ID_CHARS = 128
MAX_NEW_TOKENS = 512
DEFAULT_MAX_NEW_TOKENS = 96
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]")


class RequestError(Exception):
    """An error answered to the client (4xx, or 503/504 when busy): HTTP `status` and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # always one line


@dataclass
class Frame:
    image: Image.Image
    digest: str  # hash of the decoded pixels: the frame cache key


@dataclass
class InferenceRequest:
    frames: list[Frame]
    context: str
    question: str
    mode: str
    session_id: str | None
    max_new_tokens: int


def parse_json(body: bytes) -> dict:
    if not body:
        raise RequestError(400, "empty body (send a JSON object)")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def _looks_like_path(text: str) -> bool:
    low = text.lower()
    if low.startswith(("file:", "http:", "https:", "~", "./", "../")) or low.endswith((".png", ".jpg", ".jpeg")):
        return True
    return bool(_NOT_BASE64.search(text)) and ("/" in text or "\\" in text)


def decode_frame(value, where: str) -> Frame:
    if not isinstance(value, str):
        raise RequestError(422, f"{where}: expected a base64 PNG/JPEG string, got {type(value).__name__}")
    data = value.strip()
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(422, f"{where}: data URL must be base64 (data:image/png;base64,...)")
    elif _looks_like_path(data):
        raise RequestError(422, f"{where}: file paths and URLs are not accepted (send the image bytes as base64)")
    # A string with a slash that is not an image may be a path: say so, never open it.
    hint = " (file paths are not accepted; send the image bytes as base64)" if "/" in data or "\\" in data else ""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{where}: not valid base64{hint}") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in IMAGE_FORMATS:
                raise RequestError(422, f"{where}: {im.format} image; only PNG and JPEG are accepted")
            if im.width * im.height > MAX_PIXELS:
                raise RequestError(422, f"{where}: {im.width}x{im.height} image is too large (max {MAX_PIXELS} pixels)")
            image = im.convert("RGB")
    except RequestError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data; none may reach the model
        raise RequestError(422, f"{where}: undecodable image ({type(exc).__name__}){hint}") from None
    digest = hashlib.blake2b(image.tobytes(), digest_size=16, person=b"frame").hexdigest()
    return Frame(image, f"{image.width}x{image.height}:{digest}")


def _string(obj: dict, key: str, default: str | None, limit: int) -> str | None:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(422, f"{key}: expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(422, f"{key}: {len(value)} characters, max {limit}")
    return value


def _mode(obj: dict, default: str = "score") -> str:
    mode = obj.get("mode", default)
    if mode not in MODES:
        raise RequestError(422, f"mode: unknown mode {mode!r} (use one of: {', '.join(MODES)})")
    return mode


def _max_new_tokens(value, key: str) -> int:
    if value is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise RequestError(422, f"{key}: expected an integer from 1 to {MAX_NEW_TOKENS}")
    return value


def _frames(values: list, where: str) -> list[Frame]:
    if len(values) != FRAMES_PER_SAMPLE:
        raise RequestError(422, f"{where}: expected {FRAMES_PER_SAMPLE} frames (oldest first), got {len(values)}")
    return [decode_frame(v, f"{where}[{i}]") for i, v in enumerate(values)]


PREDICT_FIELDS = ("frames", "context", "question", "session_id", "mode", "max_new_tokens")


def parse_predict(obj: dict) -> InferenceRequest:
    unknown = sorted(set(obj) - set(PREDICT_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r} (fields: {', '.join(PREDICT_FIELDS)})")
    if "frames" not in obj:
        raise RequestError(422, "frames: missing (send 4 base64 PNG/JPEG frames, oldest first)")
    if not isinstance(obj["frames"], list):
        raise RequestError(422, f"frames: expected a list of 4 base64 strings, got {type(obj['frames']).__name__}")
    mode = _mode(obj)
    context = _string(obj, "context", "", MAX_CONTEXT_CHARS)
    question = _string(obj, "question", None, MAX_QUESTION_CHARS) or QUESTION
    session_id = _string(obj, "session_id", None, MAX_SESSION_ID_CHARS) or None
    max_new = _max_new_tokens(obj.get("max_new_tokens"), "max_new_tokens")
    return InferenceRequest(_frames(obj["frames"], "frames"), context, question, mode, session_id, max_new)


def _content_parts(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(422, f"{where}.content: expected a string or a list of parts")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise RequestError(422, f"{where}.content[{i}]: expected a part with type 'text' or 'image_url'")
    return content


def _image_url(part: dict, where: str) -> str:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise RequestError(422, f"{where}.image_url.url: expected a string")
    if not url.startswith("data:"):
        raise RequestError(422, f"{where}.image_url.url: only data: URLs are accepted (no remote or file URLs)")
    return url


def parse_chat(obj: dict) -> InferenceRequest:
    """OpenAI chat completions: 4 images (data URLs) in the user turn(s); the user text is the question,
    a system message is the context. Extensions: `mode`, `context`, `session_id` (else `user`)."""
    if obj.get("stream"):
        raise RequestError(400, "stream=true is not supported (send stream=false)")
    n = obj.get("n", 1)
    if n != 1:
        raise RequestError(422, "n: only n=1 is supported")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "messages: expected a non-empty list of {role, content} objects")
    images, system_text, user_text = [], [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(422, f"{where}: expected an object with role system, user or assistant")
        parts = _content_parts(msg.get("content"), where)
        for j, part in enumerate(parts):
            if part["type"] == "image_url":
                if msg["role"] != "user":
                    raise RequestError(422, f"{where}.content[{j}]: images are only accepted in user messages")
                images.append((_image_url(part, f"{where}.content[{j}]"), f"{where}.content[{j}]"))
            elif not isinstance(part.get("text"), str):
                raise RequestError(422, f"{where}.content[{j}].text: expected a string")
            elif msg["role"] in ("system", "developer"):
                system_text.append(part["text"])
            elif msg["role"] == "user":
                user_text.append(part["text"])
    if len(images) != FRAMES_PER_SAMPLE:
        raise RequestError(422, f"messages: expected {FRAMES_PER_SAMPLE} images (oldest first), got {len(images)}")
    frames = [decode_frame(url, where) for url, where in images]
    question = "\n".join(t for t in user_text if t.strip()).strip() or QUESTION
    if len(question) > MAX_QUESTION_CHARS + MAX_CONTEXT_CHARS:
        raise RequestError(422, "messages: user text is too long")
    context = _string(obj, "context", None, MAX_CONTEXT_CHARS)
    if context is None:
        context = "\n".join(system_text).strip()[:MAX_CONTEXT_CHARS]
    session_id = _string(obj, "session_id", None, MAX_SESSION_ID_CHARS) or _string(
        obj, "user", None, MAX_SESSION_ID_CHARS
    )
    limit = obj.get("max_completion_tokens", obj.get("max_tokens"))
    return InferenceRequest(
        frames, context, question, _mode(obj), session_id or None, _max_new_tokens(limit, "max_tokens")
    )
