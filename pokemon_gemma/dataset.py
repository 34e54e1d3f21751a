"""The JSONL record every stage reads and writes, and the answer format the model learns.

Record: {"frames": [4 paths], "context": str, "question": str, "output": "<JSON string>",
"metadata": {"session_id", "turns", "session_goal", ...}}. Frame paths are absolute, or relative
to the JSONL file's folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import JsonlError, iter_jsonl

BUTTONS = ("up", "down", "left", "right", "a", "b", "start", "select")
FRAMES_PER_SAMPLE = 4
# The most pixels one frame may declare (4096x4096). Every stage that decodes frames checks the
# size from the image header first: the converter skips (and counts) a larger frame, validate and
# training name it in a one-line error, the server answers 413. A real frame is ~240x160.
MAX_FRAME_PIXELS = 4096 * 4096
QUESTION = (
    "These are the last 4 frames of the game, oldest first. Which Game Boy button should be pressed "
    'next? Answer with JSON: {"button": one of up, down, left, right, a, b, start, select, '
    '"reasoning": str, "context": str, "scene_description": str}.'
)


class RecordError(ValueError):
    """A record that breaks the contract; the message is `file:line: field: reason`."""


@dataclass
class Record:
    frames: list[str]
    context: str
    question: str
    output: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def button(self) -> str:
        return parse_output(self.output)["button"]

    @property
    def sample_id(self) -> str:
        md = self.metadata
        turns = md.get("turns")
        return f"{md.get('session_id', '?')}:{','.join(map(str, turns)) if turns else '?'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_output(button: str, reasoning: str = "", context: str = "", scene_description: str = "") -> str:
    """The answer JSON string; `button` comes first so scoring can rank `{"button": "<b>"` answers."""
    if button not in BUTTONS:
        raise ValueError(f"invalid button {button!r}")
    return json.dumps(
        {"button": button, "reasoning": reasoning, "context": context, "scene_description": scene_description},
        ensure_ascii=False,
    )


def parse_output(output: str) -> dict[str, Any]:
    """Parse an answer; raise ValueError unless it is a JSON object with a valid `button`."""
    try:
        obj = json.loads(output)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"output is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("output is not a JSON object")
    button = obj.get("button")
    if not isinstance(button, str) or button.lower() not in BUTTONS:
        raise ValueError(f"output has no valid button (got {button!r})")
    obj["button"] = button.lower()
    return obj


def record_from_dict(obj: dict[str, Any], where: str, base_dir: Path | None = None) -> Record:
    """Validate one JSON object as a Record; relative frame paths are resolved against base_dir."""
    frames = obj.get("frames")
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        raise RecordError(f"{where}: frames: expected a list of paths")
    if len(frames) != FRAMES_PER_SAMPLE:
        raise RecordError(f"{where}: frames: expected {FRAMES_PER_SAMPLE} frames, got {len(frames)}")
    for key in ("context", "question", "output"):
        if not isinstance(obj.get(key), str):
            raise RecordError(f"{where}: {key}: expected a string")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise RecordError(f"{where}: metadata: expected an object")
    try:
        parse_output(obj["output"])
    except ValueError as exc:
        raise RecordError(f"{where}: output: {exc}") from None
    if base_dir is not None:
        frames = [f if Path(f).is_absolute() else str(base_dir / f) for f in frames]
    return Record(
        frames=frames, context=obj["context"], question=obj["question"], output=obj["output"], metadata=metadata
    )


def load_records(path: str | Path) -> list[Record]:
    """Read and validate a JSONL file; raise RecordError/JsonlError naming file:line: field."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    records = [record_from_dict(obj, f"{path}:{lineno}", path.parent) for lineno, obj in iter_jsonl(path)]
    if not records:
        raise RecordError(f"{path}: no records")
    return records


__all__ = [
    "BUTTONS",
    "QUESTION",
    "Record",
    "RecordError",
    "JsonlError",
    "make_output",
    "parse_output",
    "record_from_dict",
    "load_records",
]
