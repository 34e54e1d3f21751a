"""Client-side helpers shared by the health monitor, the benchmark and the tests: frames to base64
PNG, request payloads, and a deterministic synthetic frame stream."""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

from PIL import Image, ImageDraw

FRAME_SIZE = (160, 144)  # the Game Boy screen
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def data_url(b64: str, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64}"


def synthetic_frame(index: int, size: tuple[int, int] = FRAME_SIZE) -> Image.Image:
    """A distinct, deterministic frame: a background shade and a square that moves with `index`."""
    w, h = size
    image = Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, 120))
    draw = ImageDraw.Draw(image)
    x, y = (index * 13) % (w - 16), (index * 7) % (h - 16)
    draw.rectangle([x, y, x + 15, y + 15], fill=(255, 255, 255))
    return image


def palette_png(width: int, height: int) -> str:
    """A base64 PNG of a uniform 1-colour palette image: a few kilobytes that declare (and decode to)
    width x height pixels, the shape of a decompression bomb (benchmarks and tests of the limits)."""
    image = Image.new("P", (width, height))
    image.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def synthetic_stream(n_frames: int, start: int = 0) -> list[str]:
    """`n_frames` base64 PNG frames of one session; window i is frames[i:i+4]."""
    return [encode_image(synthetic_frame(start + i)) for i in range(n_frames)]


def load_probe_frames(folder: str | Path) -> list[str]:
    """The first 4 PNG/JPEG files (sorted by name) of a folder, as base64; ValueError if fewer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (--probe_frames needs a folder with 4 PNG/JPEG frames)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:4]
    if len(files) < 4:
        raise ValueError(f"{folder}: {len(files)} PNG/JPEG files, need 4")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                out.append(encode_image(im))
        except OSError as exc:
            raise ValueError(f"{path}: cannot decode image ({exc})") from None
    return out


def predict_payload(
    frames: list[str], *, context: str = "", session_id: str | None = None, mode: str = "score"
) -> dict:
    payload = {"frames": frames, "context": context, "mode": mode}
    if session_id is not None:
        payload["session_id"] = session_id
    return payload


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def read_api_key(var: str | None, env_file: str = ".env") -> str | None:
    """The key from the environment (else .env); SystemExit(2) when the variable is unset or empty."""
    if not var:
        return None
    from dotenv import dotenv_values

    key = os.environ.get(var) or (dotenv_values(env_file).get(var) if os.path.isfile(env_file) else None)
    if not key:
        print(
            f"error: --api_key_env {var}: variable {var} is unset or empty (export {var}=<key> or put it in .env)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return key
