"""Played sessions written as Eevee v1 (V3) runs, so the converter reads them back like recordings.

`runs/session_<id>/session_data.json` + `sshots/step_NNNN_grid.png` (+ `step_NNNN_visual_analysis.txt`
for demo-world sessions, which carry the demo's fixed vision analysis). Turn N = the frame the player
saw and the button it pressed there (the turn's decision, in the shape the converter parses), so
`convert` makes windows of the last 4 frames labelled with the pressed button.

Written after every completed step, frame first and then the JSON (each atomically), so a killed
run leaves a session that is valid and convertible up to its last completed step. Timestamps are
the real times of the presses: convert with `--max_gap_seconds 0` when a slow policy takes over a
minute per press. Extra per-turn facts (policy, the expert's button for the visited state, ...) go in
the decision's `play` key (real decisions carry extra keys too); per-session facts in
`session_metadata.play`. The JSON is compact while playing and indented once the session is closed.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from ..demo import VISUAL_ANALYSIS, png_bytes, session_data, turn_json, visual_analysis_text
from ..eevee import SESSION_DATA
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text


def session_name(tag: str, started: datetime | None = None) -> str:
    """`<YYYYMMDD_HHMMSS>_<tag>`: Eevee's id (the start time) plus a tag telling sessions of one second apart."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", tag).strip("-")
    stamp = (started or datetime.now()).strftime("%Y%m%d_%H%M%S")
    return f"{stamp}_{tag}" if tag else stamp


class SessionRecorder:
    """`rec.add_turn(frame, button, ...)` once per completed step; `rec.close(status)` at the end.

    The folder is created at the first turn (never an empty session); an existing folder is never
    overwritten: the id gets a `-2`, `-3`... suffix."""

    def __init__(
        self,
        runs_dir: str | Path,
        session_id: str,
        goal: str,
        *,
        vision: bool = False,
        meta: dict | None = None,
        started: datetime | None = None,
    ):
        self.runs_dir, self.session_id, self.goal = Path(runs_dir), session_id, goal
        self.visual = VISUAL_ANALYSIS if vision else None
        self.meta = meta or {}
        self.started = started or datetime.now()
        self.dir: Path | None = None
        self.turns: list[dict] = []
        self.enhanced: list[dict] = []

    def add_turn(
        self,
        frame: np.ndarray,
        button: str,
        *,
        reasoning: str = "",
        observations: str = "",
        context_detected: str | None = None,
        play: dict | None = None,
        pressed_at: datetime | None = None,
    ) -> Path:
        """Record that `button` was pressed on `frame`; returns the frame file."""
        if self.dir is None:
            self.dir = self._make_dir()
        number = len(self.turns) + 1
        now = datetime.now()
        turn, enhanced = turn_json(
            number,
            button,
            reasoning,
            observations,
            context_detected,
            self.goal,
            now,
            pressed_at or now,
            extra={"play": play} if play else None,
            visual=self.visual,
        )
        frame_path = atomic_write_bytes(self.dir / "sshots" / f"step_{number:04d}_grid.png", png_bytes(frame))
        if turn["visual_analysis"] is not None:
            atomic_write_text(
                self.dir / f"step_{number:04d}_visual_analysis.txt",
                visual_analysis_text(number, turn["visual_analysis"]["raw_pixtral_response"]),
            )
        self.turns.append(turn)
        self.enhanced.append(enhanced)
        self._write("running")
        return frame_path

    def close(self, status: str = "completed") -> Path | None:
        """Final rewrite with `session_metadata.status` = completed | interrupted | error (no-op without turns)."""
        if self.dir is not None:
            self._write(status)
        return self.dir

    def _write(self, status: str) -> None:
        data = session_data(self.session_id, self.goal, self.started, self.turns, self.enhanced, status)
        if self.meta:
            data["session_metadata"]["play"] = self.meta
        if status == "running":  # compact while playing (C encoder; indent=2 is pure Python and O(turns) per step)
            atomic_write_text(self.dir / SESSION_DATA, json.dumps(data, default=str))
        else:
            atomic_write_json(self.dir / SESSION_DATA, data)

    def _make_dir(self) -> Path:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        base, n = self.session_id, 1
        while True:
            path = self.runs_dir / f"session_{self.session_id}"
            try:
                path.mkdir()
            except FileExistsError:
                n += 1
                self.session_id = f"{base}-{n}"
                continue
            (path / "sshots").mkdir()
            return path


__all__ = ["SessionRecorder", "session_name"]
