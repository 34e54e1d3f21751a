"""Request parsing: every way a request can be wrong becomes a `RequestError` with a 4xx status, a
one-line reason and the offending parameter. Frames arrive only as base64 (or `data:` URL) PNG/JPEG
bytes; file paths and remote URLs are refused, never opened.

Parsing runs on a decoding thread, never on the event loop (see app.py). Frames are bounded before
any pixel is decoded: the image header declares the size, and a frame over `max_frame_pixels` or a
request over `max_request_pixels` is answered 413 from the header alone. A decoded frame larger than
the model's input is downscaled to it right away (exactly the resize the image processor would do),
so a queued request holds at most 4 model-sized frames whatever the client sent."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass

from PIL import Image

from ..dataset import FRAMES_PER_SAMPLE, MAX_FRAME_PIXELS, QUESTION

MODES = ("score", "generate")
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_REQUEST_PIXELS = MAX_FRAME_PIXELS  # the 4 frames of one request together (e.g. four 2048x2048)
MAX_CONTEXT_CHARS = 20_000
MAX_QUESTION_CHARS = 4_000
MAX_SESSION_ID_CHARS = 128
MAX_NEW_TOKENS = 512
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
DEFAULT_MAX_NEW_TOKENS = 96
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]")


class RequestError(Exception):
    """An error answered to the client: HTTP `status`, a one-line `message`, the request parameter it
    is about (`param`, OpenAI's field; None when it is the whole request) and an optional `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # always one line
        self.param = param
        self.code = code


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> RequestError:
    """A client mistake: 400, as OpenAI answers invalid requests."""
    return RequestError(400, message, param, code)


@dataclass(frozen=True)
class FrameLimits:
    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS
    target_size: tuple[int, int] | None = None  # (width, height) of the model's input
    resample: int = Image.Resampling.BILINEAR  # the image processor's resample filter


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
    logprobs: bool = False  # chat completions: return the buttons' log-probabilities
    top_logprobs: int | None = None
    stream: bool = False
    stream_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def parse_json(body: bytes) -> dict:
    if not body:
        raise invalid("empty body (send a JSON object)")
    try:
        obj = json.loads(body)
    except RecursionError:
        raise invalid("body is nested too deeply (not a request this server reads)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise invalid(f"body is not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise invalid(f"body must be a JSON object, got {type(obj).__name__}")
    return obj


def check_text(value: str, param: str) -> str:
    """`value` unless it cannot be UTF-8 (a lone surrogate such as "\\ud800" from a JSON escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(
            f"{param}: invalid Unicode at character {exc.start} (a lone surrogate; send valid UTF-8 text)", param
        ) from None
    return value


def _looks_like_path(text: str) -> bool:
    low = text.lower()
    if low.startswith(("file:", "http:", "https:", "~", "./", "../")) or low.endswith((".png", ".jpg", ".jpeg")):
        return True
    return bool(_NOT_BASE64.search(text)) and ("/" in text or "\\" in text)


def _frame_bytes(value, where: str) -> tuple[bytes, str]:
    """The image bytes of one frame (base64 or a data URL) and a hint for undecodable data."""
    if not isinstance(value, str):
        raise invalid(f"{where}: expected a base64 PNG/JPEG string, got {type(value).__name__}", where)
    data = value.strip()
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid(f"{where}: data URL must be base64 (data:image/png;base64,...)", where)
    elif _looks_like_path(data):
        raise invalid(f"{where}: file paths and URLs are not accepted (send the image bytes as base64)", where)
    # A string with a slash that is not an image may be a path: say so, never open it.
    hint = " (file paths are not accepted; send the image bytes as base64)" if "/" in data or "\\" in data else ""
    try:
        return base64.b64decode(data, validate=True), hint
    except (binascii.Error, ValueError):
        raise invalid(f"{where}: not valid base64{hint}", where) from None


def _open_header(raw: bytes, where: str, hint: str, limits: FrameLimits) -> Image.Image:
    """Open lazily (only the header is read) and check format and declared size."""
    try:
        im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"{where}: image too large ({exc})", where, "image_too_large") from None
    except Exception as exc:  # PIL raises many types for corrupt data; none may reach the model
        raise invalid(f"{where}: undecodable image ({type(exc).__name__}){hint}", where) from None
    if im.format not in IMAGE_FORMATS:
        im.close()
        raise invalid(f"{where}: {im.format} image; only PNG and JPEG are accepted", where)
    if im.width * im.height > limits.max_frame_pixels:
        im.close()
        raise RequestError(
            413,
            f"{where}: {im.width}x{im.height} image is too large (max {limits.max_frame_pixels} pixels per frame)",
            where,
            "image_too_large",
        )
    return im


def _decode(im: Image.Image, where: str, hint: str, limits: FrameLimits) -> Frame:
    try:
        image = im.convert("RGB")
    except Exception as exc:
        raise invalid(f"{where}: undecodable image ({type(exc).__name__}){hint}", where) from None
    finally:
        im.close()
    target = limits.target_size
    if target is not None and image.width * image.height > target[0] * target[1]:
        # What the image processor would do later, done now: the queue holds model-sized frames.
        image = image.resize(target, limits.resample)
    digest = hashlib.blake2b(image.tobytes(), digest_size=16, person=b"frame").hexdigest()
    return Frame(image, f"{image.width}x{image.height}:{digest}")


def decode_frames(values: list[tuple[object, str]], limits: FrameLimits) -> list[Frame]:
    """(value, where) pairs -> decoded frames. Every header is checked (per frame and for the whole
    request) before the first pixel is decoded; frames are then decoded one at a time."""
    opened: list[tuple[Image.Image, str, str]] = []
    try:
        total = 0
        for value, where in values:
            raw, hint = _frame_bytes(value, where)
            im = _open_header(raw, where, hint, limits)
            opened.append((im, where, hint))
            total += im.width * im.height
            if total > limits.max_request_pixels:
                raise RequestError(
                    413,
                    f"{where}: the frames declare {total} pixels together, more than the "
                    f"{limits.max_request_pixels}-pixel limit per request",
                    where,
                    "image_too_large",
                )
        return [_decode(im, where, hint, limits) for im, where, hint in opened]
    finally:
        for im, _, _ in opened:
            im.close()


def decode_frame(value, where: str, limits: FrameLimits | None = None) -> Frame:
    return decode_frames([(value, where)], limits or FrameLimits())[0]


def _string(obj: dict, key: str, default: str | None, limit: int) -> str | None:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(f"{key}: expected a string, got {type(value).__name__}", key, "invalid_type")
    if len(value) > limit:
        raise invalid(f"{key}: {len(value)} characters, max {limit}", key, "string_above_max_length")
    return check_text(value, key)


def _mode(obj: dict, default: str = "score") -> str:
    mode = obj.get("mode", default)
    if mode not in MODES:
        raise invalid(f"mode: unknown mode {mode!r} (use one of: {', '.join(MODES)})", "mode")
    return mode


def _max_new_tokens(value, key: str) -> int:
    if value is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise invalid(f"{key}: expected an integer from 1 to {MAX_NEW_TOKENS}", key)
    return value


def _frames(values: list, where: str, limits: FrameLimits) -> list[Frame]:
    if len(values) != FRAMES_PER_SAMPLE:
        raise invalid(f"{where}: expected {FRAMES_PER_SAMPLE} frames (oldest first), got {len(values)}", where)
    return decode_frames([(v, f"{where}[{i}]") for i, v in enumerate(values)], limits)


PREDICT_FIELDS = ("frames", "context", "question", "session_id", "mode", "max_new_tokens")


def parse_predict(obj: dict, limits: FrameLimits | None = None) -> InferenceRequest:
    unknown = sorted(set(obj) - set(PREDICT_FIELDS))
    if unknown:
        raise invalid(
            f"unknown field {unknown[0]!r} (fields: {', '.join(PREDICT_FIELDS)})", unknown[0], "unknown_parameter"
        )
    if "frames" not in obj:
        raise invalid("frames: missing (send 4 base64 PNG/JPEG frames, oldest first)", "frames", "missing_parameter")
    if not isinstance(obj["frames"], list):
        raise invalid(
            f"frames: expected a list of 4 base64 strings, got {type(obj['frames']).__name__}", "frames", "invalid_type"
        )
    mode = _mode(obj)
    context = _string(obj, "context", "", MAX_CONTEXT_CHARS)
    question = _string(obj, "question", None, MAX_QUESTION_CHARS) or QUESTION
    session_id = _string(obj, "session_id", None, MAX_SESSION_ID_CHARS) or None
    max_new = _max_new_tokens(obj.get("max_new_tokens"), "max_new_tokens")
    frames = _frames(obj["frames"], "frames", limits or FrameLimits())
    return InferenceRequest(frames, context, question, mode, session_id, max_new)


def _content_parts(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"{where}.content: expected a string or a list of parts", f"{where}.content")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise invalid(
                f"{where}.content[{i}]: expected a part with type 'text' or 'image_url'", f"{where}.content[{i}]"
            )
    return content


def _image_url(part: dict, where: str) -> str:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise invalid(f"{where}.image_url.url: expected a string", f"{where}.image_url.url")
    if not url.startswith("data:"):
        raise invalid(
            f"{where}.image_url.url: only data: URLs are accepted (no remote or file URLs)", f"{where}.image_url.url"
        )
    return url


def _logprobs(obj: dict) -> tuple[bool, int | None]:
    want = obj.get("logprobs")
    if want is None:
        want = False
    if not isinstance(want, bool):
        raise invalid("logprobs: expected true or false", "logprobs", "invalid_type")
    top = obj.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise invalid(f"top_logprobs: expected an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
        if not want:
            raise invalid("top_logprobs: needs logprobs=true", "top_logprobs")
    return want, top


def parse_chat(obj: dict, limits: FrameLimits | None = None) -> InferenceRequest:
    """OpenAI chat completions: 4 images (data URLs) in the user turn(s); the user text is the question,
    a system message is the context. Extensions: `mode`, `context`, `session_id` (else `user`)."""
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream: expected true or false", "stream", "invalid_type")
    options = obj.get("stream_options")
    bad_options = not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    if options is not None and bad_options:
        raise invalid('stream_options: expected {"include_usage": true|false}', "stream_options", "invalid_type")
    if options is not None and not stream:
        raise invalid("stream_options: only with stream=true", "stream_options")
    stream_usage = bool(options and options.get("include_usage"))
    n = obj.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise invalid("n: only n=1 is supported", "n")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: expected a non-empty list of {role, content} objects", "messages")
    images, system_text, user_text = [], [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise invalid(f"{where}: expected an object with role system, user or assistant", where)
        parts = _content_parts(msg.get("content"), where)
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]"
            if part["type"] == "image_url":
                if msg["role"] != "user":
                    raise invalid(f"{at}: images are only accepted in user messages", at)
                images.append((_image_url(part, at), at))
            elif not isinstance(part.get("text"), str):
                raise invalid(f"{at}.text: expected a string", f"{at}.text", "invalid_type")
            elif msg["role"] in ("system", "developer"):
                system_text.append(check_text(part["text"], f"{at}.text"))
            elif msg["role"] == "user":
                user_text.append(check_text(part["text"], f"{at}.text"))
    if len(images) != FRAMES_PER_SAMPLE:
        raise invalid(f"messages: expected {FRAMES_PER_SAMPLE} images (oldest first), got {len(images)}", "messages")
    question = "\n".join(t for t in user_text if t.strip()).strip() or QUESTION
    if len(question) > MAX_QUESTION_CHARS + MAX_CONTEXT_CHARS:
        raise invalid("messages: user text is too long", "messages", "string_above_max_length")
    context = _string(obj, "context", None, MAX_CONTEXT_CHARS)
    if context is None:
        context = "\n".join(system_text).strip()[:MAX_CONTEXT_CHARS]
    session_id = _string(obj, "session_id", None, MAX_SESSION_ID_CHARS) or _string(
        obj, "user", None, MAX_SESSION_ID_CHARS
    )
    key = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _max_new_tokens(obj.get(key), key)
    mode = _mode(obj)
    logprobs, top_logprobs = _logprobs(obj)
    if logprobs and mode == "generate":
        raise invalid(
            "logprobs: only in score mode (the 8 buttons' log-probabilities); mode 'generate' does not return them",
            "logprobs",
            "unsupported_parameter",
        )
    frames = decode_frames(images, limits or FrameLimits())
    return InferenceRequest(
        frames, context, question, mode, session_id or None, max_new, logprobs, top_logprobs, bool(stream), stream_usage
    )
