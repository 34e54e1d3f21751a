"""Reading Eevee v1 runs (format versions V0 to V3) into plain turn records.

The format is described in ../shared/eevee-v1-format.md. This module only reads: one session at a
time (`read_session`), so a caller can stream a corpus of any size with flat memory. Windows,
labels and splits live in `convert.py`.

Every problem with the input is a `Problem(file, reason, detail)`; a session that cannot be read at
all raises `SessionError` carrying one. Turns that are present but malformed are kept in the turn
list with `error` set, so that a window never silently straddles them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .dataset import BUTTONS

SESSION_DATA = "session_data.json"

# Keys each writer version put at the top level and in each turn (the spec, section 2).
TOP_KEYS_V0 = {"goal", "total_turns", "max_turns", "session_duration", "gameplay_history", "final_status"}
TOP_KEYS_V1 = {"session_id", "goal", "start_time", "turns", "session_metadata", "enhanced_turns"}
TURN_KEYS = {
    "turn",
    "timestamp",
    "goal",
    "ai_analysis",
    "button_presses",
    "action_result",
    "screenshot_path",
    "execution_time",
    "battle_context",  # V0
    "template_used",
    "template_version",  # V1b
    "visual_analysis",
    "strategic_context",
    "memory_context",  # V3
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_JSON_BLOCK = re.compile(r"```json\s*(\{.*?\})\s*```", re.S)


@dataclass
class Problem:
    """One thing wrong with the input; `reason` is a stable code used in summaries and tests."""

    file: str
    reason: str
    detail: str

    def line(self) -> str:
        return f"{self.file}: {self.reason}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason, "detail": self.detail}


class SessionError(Exception):
    """A session that cannot be used at all."""

    def __init__(self, problem: Problem):
        super().__init__(problem.line())
        self.problem = problem


@dataclass
class Turn:
    """One recorded turn. `error` set means the turn is malformed and breaks every window over it."""

    index: int  # position in the recorded list
    turn: int | None = None  # loop counter (1-based; may have holes)
    time: float | None = None  # seconds since the epoch (naive local time)
    decision: dict[str, Any] | None = None  # ai_analysis.parsed_json (or the ```json block of a V0/V1 string)
    buttons: list[str] = field(default_factory=list)  # valid buttons of the decision, lower case, in order
    raw_buttons: list[Any] | None = None  # decision.button_presses as written (may hold invalid names)
    no_label_reason: str | None = None  # why this turn cannot be a target (None when it has a label)
    frame: Path | None = None  # candidate frame file (existence not yet checked), None if none
    template_used: str = "unknown"
    template_version: str = "unknown"
    confidence: str | None = None
    context_detected: str | None = None
    reasoning: str = ""
    observations: str = ""
    scene_type: str | None = None  # V3 visual_analysis.scene_type
    error: str | None = None  # reason code when malformed
    error_detail: str = ""

    @property
    def label(self) -> str | None:
        return self.buttons[0] if self.buttons else None


@dataclass
class Session:
    session_id: str
    dir: Path
    data_file: Path
    goal: str
    version: str
    turns: list[Turn]
    problems: list[Problem] = field(default_factory=list)


def find_runs_dir(path: str | Path) -> Path:
    """`path` may be a runs/ folder, its parent (runs/ or eevee/runs/ inside) or one session folder."""
    path = Path(path)
    for candidate in (path / "runs", path / "eevee" / "runs"):
        if candidate.is_dir():
            return candidate
    return path


def iter_session_dirs(runs_dir: Path) -> Iterator[Path]:
    """Session folders in sorted order: `session_*`, legacy `*_continuous`, or any folder holding session_data.json."""
    if (runs_dir / SESSION_DATA).is_file():
        yield runs_dir
        return
    for child in sorted(runs_dir.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if child.name.startswith("session_") or child.name.endswith("_continuous") or (child / SESSION_DATA).exists():
            yield child


def parse_time(value: Any) -> float | None:
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def extract_json_block(text: str) -> dict[str, Any] | None:
    """The first ```json {...}``` block of an LLM reply, as the writer's own parser reads it (non-greedy)."""
    for match in _JSON_BLOCK.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None
    return None


def decision_buttons(decision: dict[str, Any] | None) -> tuple[list[str], list[Any] | None, str | None]:
    """(valid buttons lower-cased, raw list, reason there is no label). `select` stays `select`."""
    if decision is None:
        return [], None, "no_parsed_decision"
    raw = decision.get("button_presses")
    if raw is None:
        if "pathfinding_action" in decision:
            return [], None, "pathfinding_no_buttons"
        return [], None, "no_button_presses"
    if not isinstance(raw, list):
        return [], None, "button_presses_not_a_list"
    if not raw:
        return [], raw, "pathfinding_no_buttons" if "pathfinding_action" in decision else "empty_button_presses"
    valid = [b.strip().lower() for b in raw if isinstance(b, str) and b.strip().lower() in BUTTONS]
    return valid, raw, None if valid else "invalid_buttons_only"


def frame_candidates(session_dir: Path, turn: int, screenshot_path: Any) -> Iterator[Path]:
    """Where the frame of a turn may be, newest layout first (spec section 1 and 4)."""
    yield session_dir / "sshots" / f"step_{turn:04d}_grid.png"
    yield session_dir / f"step_{turn:04d}_grid.png"
    if isinstance(screenshot_path, str) and screenshot_path.strip():
        p = Path(screenshot_path)
        yield p if p.is_absolute() else session_dir / p
    yield session_dir / f"screenshot_{turn}.png"


def find_frame(session_dir: Path, turn: int, screenshot_path: Any) -> Path | None:
    for p in frame_candidates(session_dir, turn, screenshot_path):
        if p.is_file():  # a directory (e.g. session_dir / "") is never a frame
            return p
    return None


def scene_from_visual_txt(path: Path) -> str | None:
    """scene_type from a step_NNNN_visual_analysis.txt (JSON block, or the legacy `LOCATION CLASS:` line)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    block = extract_json_block(text)
    if block is not None and isinstance(block.get("scene_type"), str):
        return block["scene_type"]
    m = re.search(r"^LOCATION CLASS:\s*(\S+)", text, re.M)
    return m.group(1) if m else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _type_name(value: Any) -> str:
    return type(value).__name__


def _read_turn(raw: Any, index: int, session_dir: Path, prev_turn: int | None) -> Turn:
    t = Turn(index=index)
    if not isinstance(raw, dict):
        t.error, t.error_detail = "wrong_type", f"turns[{index}] is a {_type_name(raw)}, expected an object"
        return t
    extra = sorted(set(raw) - TURN_KEYS)
    if extra:
        t.error, t.error_detail = "unexpected_fields", f"turns[{index}] has unknown keys {extra}"
        return t
    number = raw.get("turn")
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        t.error, t.error_detail = "wrong_type", f"turns[{index}].turn is {number!r}, expected a non-negative integer"
        return t
    t.turn = number
    if prev_turn is not None and number <= prev_turn:
        t.error, t.error_detail = "turn_order", f"turns[{index}].turn {number} does not increase (previous {prev_turn})"
        return t
    t.time = parse_time(raw.get("timestamp"))
    if t.time is None:
        t.time = parse_time(raw.get("execution_time"))  # V1+ execution_time is ISO; V0's is a duration
    if t.time is None:
        t.error, t.error_detail = (
            "bad_timestamp",
            f"turns[{index}].timestamp {raw.get('timestamp')!r} is not an ISO time",
        )
        return t

    analysis = raw.get("ai_analysis")
    if isinstance(analysis, dict):
        parsed = analysis.get("parsed_json")
        if parsed is not None and not isinstance(parsed, dict):
            t.error, t.error_detail = "wrong_type", f"turns[{index}].ai_analysis.parsed_json is a {_type_name(parsed)}"
            return t
        t.decision = parsed
    elif isinstance(analysis, str):
        t.decision = extract_json_block(analysis)  # V0/V1: the reply text; its ```json block is the decision
    elif analysis is not None:
        t.error, t.error_detail = "wrong_type", f"turns[{index}].ai_analysis is a {_type_name(analysis)}"
        return t
    t.buttons, t.raw_buttons, t.no_label_reason = decision_buttons(t.decision)

    d = t.decision or {}
    t.reasoning = d.get("reasoning") if isinstance(d.get("reasoning"), str) else ""
    t.observations = d.get("observations") if isinstance(d.get("observations"), str) else ""
    t.context_detected = _str_or_none(d.get("context_detected"))
    t.confidence = _str_or_none(d.get("confidence"))
    t.template_used = _str_or_none(raw.get("template_used")) or "unknown"
    t.template_version = _str_or_none(raw.get("template_version")) or "unknown"
    visual = raw.get("visual_analysis")
    if isinstance(visual, dict):
        t.scene_type = _str_or_none(visual.get("scene_type"))
    t.frame = find_frame(session_dir, number, raw.get("screenshot_path"))
    return t


def _version(data: dict[str, Any], turns: list[Any]) -> str:
    if "gameplay_history" in data:
        return "V0"
    first = next((t for t in turns if isinstance(t, dict)), {})
    if isinstance(first.get("ai_analysis"), str):
        return "V1b" if "template_used" in first else "V1a"
    if any(k in first for k in ("visual_analysis", "strategic_context", "memory_context")):
        return "V3"
    return "V2"


def _session_id(data: dict[str, Any], session_dir: Path) -> str:
    meta = data.get("session_metadata")
    for value in (data.get("session_id"), meta.get("session_id") if isinstance(meta, dict) else None):
        if isinstance(value, str) and _SAFE_ID.match(value):
            return value
    name = session_dir.name
    return name[len("session_") :] if name.startswith("session_") else name


def read_session(session_dir: str | Path) -> Session:
    """Read one session folder; raise SessionError when nothing in it is usable."""
    session_dir = Path(session_dir)
    data_file = session_dir / SESSION_DATA
    where = str(data_file)
    if not data_file.is_file():
        raise SessionError(
            Problem(
                str(session_dir),
                "no_session_data",
                f"no {SESSION_DATA} (a stand-alone visual-analysis folder or an interrupted run)",
            )
        )
    try:
        text = data_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SessionError(Problem(where, "unreadable", f"cannot read ({exc.__class__.__name__}: {exc})")) from None
    if not text.strip():
        raise SessionError(Problem(where, "empty_file", "session_data.json is empty"))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SessionError(
            Problem(
                f"{where}:{exc.lineno}",
                "invalid_json",
                f"{exc.msg} at column {exc.colno} (truncated or hand-edited file?)",
            )
        ) from None
    except RecursionError:
        raise SessionError(Problem(where, "invalid_json", "nested too deeply for a session (hostile file?)")) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise SessionError(Problem(where, "invalid_json", f"{str(exc).split(':')[0]} (hostile file?)")) from None
    if not isinstance(data, dict):
        raise SessionError(Problem(where, "wrong_type", f"top level is a {_type_name(data)}, expected an object"))
    key = "gameplay_history" if "gameplay_history" in data else "turns"
    if key not in data:
        raise SessionError(
            Problem(where, "unrecognised_format", f"no 'turns' or 'gameplay_history' list (keys: {sorted(data)[:8]})")
        )
    raw_turns = data[key]
    if not isinstance(raw_turns, list):
        raise SessionError(Problem(where, "wrong_type", f"'{key}' is a {_type_name(raw_turns)}, expected a list"))
    if not raw_turns:
        raise SessionError(Problem(where, "empty_session", f"'{key}' is empty (session interrupted before turn 1)"))

    problems: list[Problem] = []
    extra = sorted(set(data) - TOP_KEYS_V0 - TOP_KEYS_V1)
    if extra:
        problems.append(Problem(where, "unexpected_fields", f"unknown top-level keys {extra}"))
    goal = data.get("goal")
    meta = data.get("session_metadata")
    if not isinstance(goal, str) and isinstance(meta, dict):
        goal = meta.get("goal")
    if goal is not None and not isinstance(goal, str):
        problems.append(Problem(where, "wrong_type", f"goal is a {_type_name(goal)}, expected a string"))
    goal = goal if isinstance(goal, str) else ""

    turns: list[Turn] = []
    prev: int | None = None
    for i, raw in enumerate(raw_turns):
        t = _read_turn(raw, i, session_dir, prev)
        if t.error:
            problems.append(Problem(where, t.error, t.error_detail))
        elif t.turn is not None:
            prev = t.turn
        turns.append(t)
    return Session(
        session_id=_session_id(data, session_dir),
        dir=session_dir,
        data_file=data_file,
        goal=goal,
        version=_version(data, raw_turns),
        turns=turns,
        problems=problems,
    )


__all__ = [
    "Problem",
    "Session",
    "SessionError",
    "Turn",
    "decision_buttons",
    "extract_json_block",
    "find_frame",
    "find_runs_dir",
    "iter_session_dirs",
    "parse_time",
    "read_session",
    "scene_from_visual_txt",
]
