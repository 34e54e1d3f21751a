"""Eevee v1 runs → 4-frame JSONL records: windows, labels, context, splits, summary.

One session is converted at a time (`convert_session`, run in a process pool with `workers > 1`),
its records are appended to a temp file, and only per-session counters stay in memory, so memory is
flat in the corpus size. Splits are assigned per session id once all sessions are known, in a
second pass over the temp file that needs no JSON parsing (records are grouped by session).

Window rule: `min_frames`..4 consecutive entries of the recorded turn list ending at the target
turn; a hole in the turn numbers alone does not break a window, a malformed turn, a missing or
corrupt frame, or a time gap does. Windows shorter than 4 (only when --min_frames < 4) repeat their
oldest frame. The label is the first valid button of the target turn's own decision; a target with
no such button is skipped and counted, never defaulted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .dataset import FRAMES_PER_SAMPLE, MAX_FRAME_PIXELS, QUESTION, make_output
from .eevee import (
    Problem,
    Session,
    SessionError,
    Turn,
    find_runs_dir,
    iter_session_dirs,
    read_session,
    scene_from_visual_txt,
)
from .fileio import atomic_write_json, move_entries, scratch_dir
from .progress import progress as progress_bar

FULL_NAME = "pokemon_4frame_dataset_full.jsonl"
SPLITS = ("train", "val", "test")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PROBLEMS_IN_SUMMARY = 2000
MAX_WARNINGS_PRINTED = 50

# Session-level reasons that mean "this session gave nothing" (also problems for --strict).
FIX_HINTS = {
    "no_session_data": "only folders with session_data.json are sessions",
    "unreadable": "check file permissions/encoding",
    "empty_file": "re-export the session or delete the folder",
    "invalid_json": "the file is truncated or corrupt; restore it or delete the session",
    "wrong_type": "the field has the wrong JSON type; see ../shared/eevee-v1-format.md",
    "unrecognised_format": "not an Eevee v1 session_data.json (V0-V3)",
    "unexpected_fields": "keys outside the V0-V3 formats; remove them or extend pokemon_gemma/eevee.py",
    "empty_session": "the session has no turns",
    "turn_order": "turn numbers must increase in the recorded list",
    "bad_timestamp": "turn timestamps must be ISO times",
    "missing_frame": "the turn's sshots/step_NNNN_grid.png is missing",
    "corrupt_frame": "the PNG does not decode; re-capture or delete it",
    "oversized_frame": f"the PNG declares more than {MAX_FRAME_PIXELS} pixels (a decompression bomb?); delete it",
    "too_few_turns": "fewer recorded turns than --min_frames",
    "no_frames": "no turn has a frame file (V0 screenshot paths point at the recording machine)",
    "no_valid_windows": "every window was skipped; see windows_skipped for why",
    "duplicate_session_id": "two folders hold the same session_id; keep one",
}


class ConvertError(Exception):
    """--strict: the first problem found (message is `file: reason: detail (hint)`)."""


class UsageError(ValueError):
    """Bad options (exit code 2)."""


@dataclass
class ConvertOptions:
    min_frames: int = 4
    max_gap_seconds: float = 60.0
    copy_images: bool = False
    output_dir: str = ""  # images go to output_dir/images/<session>/ when copy_images (the staging folder)
    previous_dir: str = ""  # the published output: its identical image copies are hard-linked, not copied again
    history_in_context: bool = False  # add earlier turns' buttons/scene to the model-visible context

    def check(self) -> None:
        if not 1 <= self.min_frames <= FRAMES_PER_SAMPLE:
            raise UsageError(f"--min_frames must be between 1 and {FRAMES_PER_SAMPLE}, got {self.min_frames}")


@dataclass
class SessionResult:
    dir: str
    image_key: str  # folder name under images/ (unique per session folder)
    session_id: str | None = None
    version: str | None = None
    lines: list[str] = field(default_factory=list)  # JSON records, encoded in the worker (cheap to pass back)
    labels: list[str] = field(default_factory=list)  # per record: button, scene context (for the summary)
    contexts: list[str] = field(default_factory=list)
    candidates: int = 0  # target positions examined
    window_skips: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    skip_reason: str | None = None
    skip_detail: str = ""
    n_turns: int = 0
    frames_checked: int = 0
    images_copied: int = 0
    window_digests: list[bytes] = field(default_factory=list)


def hint(reason: str) -> str:
    return FIX_HINTS.get(reason, "see summary.json")


def png_problem(data: bytes) -> str | None:
    """Why these bytes are not a well-formed PNG, or None: signature, every chunk's length and CRC, IHDR
    first, IDAT present, IEND last (what PIL's verify checks, at a fraction of its cost). A truncated
    copy or flipped bytes fail here; the pixel stream is not inflated (about 0.6 ms per real frame)."""
    if not data.startswith(PNG_SIGNATURE):
        return "no PNG signature"
    pos, n, idat, first = 8, len(data), 0, True
    width = height = 0
    while True:
        if pos + 12 > n:
            return "truncated (no IEND chunk)"
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n:
            return f"truncated inside a {ctype!r} chunk"
        if zlib.crc32(data[pos + 4 : pos + 8 + length]) != struct.unpack(">I", data[end - 4 : end])[0]:
            return f"bad CRC in a {ctype!r} chunk"
        if first:
            if ctype != b"IHDR" or length != 13:
                return "first chunk is not IHDR"
            width, height = struct.unpack(">II", data[pos + 8 : pos + 16])
            first = False
        elif ctype == b"IDAT":
            idat += 1
        elif ctype == b"IEND":
            break
        pos = end
    if not idat or not width or not height:
        return "no image data"
    return None


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR of a PNG that passed `png_problem`."""
    return struct.unpack(">II", data[16:24])


def check_frame(path: Path) -> tuple[str | None, bytes]:
    """(None, digest) for a PNG that decodes; (reason, b"") otherwise. Reads the file once. A frame that
    declares more than MAX_FRAME_PIXELS (a decompression bomb: a few KB that decode to gigabytes) is
    `oversized_frame`: no later stage could decode it."""
    try:
        data = path.read_bytes()
    except OSError:
        return "missing_frame", b""
    if png_problem(data):
        return "corrupt_frame", b""
    width, height = png_size(data)
    if width * height > MAX_FRAME_PIXELS:
        return "oversized_frame", b""
    return None, hashlib.blake2b(data, digest_size=8).digest()


def vision_scene(session: Session, t: Turn) -> str | None:
    """The vision model's scene_type: V3 turn field, else the step's visual-analysis .txt (V2 and older)."""
    return t.scene_type or scene_from_visual_txt(session.dir / f"step_{t.turn:04d}_visual_analysis.txt")


def scene_context(t: Turn, scene_type: str | None) -> str:
    """The target's scene context (navigation/battle/menu/...): context_detected, then vision scene_type."""
    return t.context_detected or scene_type or "unknown"


def build_context(goal: str, earlier: list[Turn | None], history: bool = False) -> str:
    """Model-visible text: the goal, and with `history` what EARLIER turns did; never the target turn's fields.

    Goal only by default: the button should come from the frames, not from a repeat-last shortcut in
    the text (previous buttons are in metadata.previous_buttons for baselines)."""
    lines = [f"Goal: {goal}" if goal else "Goal: (not recorded)"]
    known = [t for t in earlier if t is not None]
    if history and known:
        lines.append("Previous buttons (oldest first): " + ", ".join(t.label or "unknown" for t in known))
        last = earlier[-1]
        if last is not None and (last.context_detected or last.scene_type):
            lines.append(f"Previous scene: {last.context_detected or last.scene_type}")
    return "\n".join(lines)


def _frame_ref(session: Session, res: SessionResult, t: Turn, opts: ConvertOptions) -> str:
    if opts.copy_images:
        return f"images/{res.image_key}/step_{t.turn:04d}_grid.png"
    return os.path.abspath(t.frame)


def _copy_frame(src: Path, dest: Path, previous: Path | None = None) -> bool:
    """Copy a frame into the staging folder; True when bytes were copied. An earlier output's copy with
    the same size and mtime is hard-linked instead (same file system), so reruns stay cheap."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    st = src.stat()
    if previous is not None:
        try:
            old = previous.stat()
            if old.st_size == st.st_size and int(old.st_mtime) == int(st.st_mtime):
                os.link(previous, dest)
                return False
        except OSError:
            pass
    shutil.copy2(src, dest)
    return True


def convert_session(session_dir: str | Path, opts: ConvertOptions) -> SessionResult:
    """All windows of one session folder, with every skipped window counted by reason."""
    try:
        return _convert_session(Path(session_dir), opts)
    except RecursionError:  # a value nested just under the JSON parser's limit, met again when writing it out
        name = Path(session_dir).name
        res = SessionResult(dir=str(session_dir), image_key=name.removeprefix("session_"))
        res.skip_reason, res.skip_detail = "invalid_json", "a value is nested too deeply (hostile file?)"
        res.problems.append(Problem(str(Path(session_dir) / "session_data.json"), res.skip_reason, res.skip_detail))
        return res


def _convert_session(session_dir: Path, opts: ConvertOptions) -> SessionResult:
    name = session_dir.name
    res = SessionResult(
        dir=str(session_dir), image_key=name[len("session_") :] if name.startswith("session_") else name
    )
    try:
        session = read_session(session_dir)
    except SessionError as exc:
        res.problems.append(exc.problem)
        res.skip_reason, res.skip_detail = exc.problem.reason, exc.problem.detail
        return res
    res.session_id, res.version, res.n_turns = session.session_id, session.version, len(session.turns)
    res.problems.extend(session.problems)
    turns = session.turns
    if len(turns) < opts.min_frames:
        res.skip_reason, res.skip_detail = "too_few_turns", f"{len(turns)} turns < --min_frames {opts.min_frames}"
        res.problems.append(Problem(str(session.data_file), res.skip_reason, res.skip_detail))
        return res
    if not any(t.frame for t in turns if not t.error):
        res.skip_reason = "no_frames"
        res.skip_detail = f"none of {len(turns)} turns has a frame file ({session.version})"
        res.problems.append(Problem(str(session.dir), res.skip_reason, res.skip_detail))
        return res

    frame_status: dict[int, tuple[str | None, bytes]] = {}
    bad_frames: dict[str, list[str]] = {}

    def frame_ok(t: Turn) -> str | None:
        if t.index not in frame_status:
            if t.frame is None:
                status: tuple[str | None, bytes] = ("missing_frame", b"")
            else:
                status = check_frame(t.frame)
                res.frames_checked += 1
            frame_status[t.index] = status
            if status[0]:
                where = str(t.frame) if t.frame else str(session.dir / "sshots" / f"step_{t.turn:04d}_grid.png")
                bad_frames.setdefault(status[0], []).append(where)
        return frame_status[t.index][0]

    refs: dict[int, str] = {}

    def frame_ref(t: Turn) -> str:
        if t.index not in refs:
            refs[t.index] = _frame_ref(session, res, t, opts)
        return refs[t.index]

    gap_limit = opts.max_gap_seconds if opts.max_gap_seconds > 0 else math.inf
    used: dict[int, Turn] = {}
    for i in range(opts.min_frames - 1, len(turns)):
        res.candidates += 1
        target = turns[i]
        if target.error:
            res.window_skips["malformed_turn"] += 1
            continue
        if target.label is None:
            res.window_skips[target.no_label_reason or "no_label"] += 1
            continue
        run, reason = [target], frame_ok(target)
        j = i
        while reason is None and len(run) < FRAMES_PER_SAMPLE and j > 0:
            prev, cur = turns[j - 1], turns[j]
            if prev.error:
                reason = "malformed_turn"
            elif not 0 <= cur.time - prev.time <= gap_limit:
                reason = "time_gap"
            else:
                reason = frame_ok(prev)
            if reason is None:
                run.insert(0, prev)
                j -= 1
        if len(run) < opts.min_frames:
            res.window_skips[reason or "session_start"] += 1
            continue
        pad = FRAMES_PER_SAMPLE - len(run)
        slots: list[Turn | None] = [None] * pad + run  # None = padding (repeats the oldest frame)
        frames_turns = [run[0]] * pad + run
        for t in run:
            used[t.index] = t
        scene_type = vision_scene(session, target)
        context = scene_context(target, scene_type)
        earlier = slots[:-1]
        record = {
            "frames": [frame_ref(t) for t in frames_turns],
            "context": build_context(session.goal, earlier, opts.history_in_context),
            "question": QUESTION,
            "output": make_output(target.label, target.reasoning, context, target.observations),
            "metadata": {
                "session_id": session.session_id,
                "turns": [t.turn for t in frames_turns],
                "session_goal": session.goal,
                "button": target.label,
                "buttons": target.raw_buttons,
                "confidence": target.confidence,
                "template_used": target.template_used,
                "template_version": target.template_version,
                "previous_buttons": [t.label if t else None for t in earlier],
                "context_detected": target.context_detected,
                "context": context,
                "scene_context": context,
                "scene_type": scene_type,
                "padded_frames": pad,
                "format_version": session.version,
                "source": "eevee_v1",
            },
        }
        res.lines.append(json.dumps(record, ensure_ascii=False))
        res.labels.append(target.label)
        res.contexts.append(context)
        res.window_digests.append(
            hashlib.blake2b(b"".join(frame_status[t.index][1] for t in frames_turns), digest_size=8).digest()
        )

    for reason, paths in bad_frames.items():
        more = f" (and {len(paths) - 1} more in this session)" if len(paths) > 1 else ""
        res.problems.append(Problem(paths[0], reason, f"frame needed by a window{more}"))
    if not res.lines:
        res.skip_reason = "no_valid_windows"
        res.skip_detail = ", ".join(f"{k} {v}" for k, v in res.window_skips.most_common())
        res.problems.append(Problem(str(session.data_file), res.skip_reason, f"windows skipped: {res.skip_detail}"))
    elif opts.copy_images:
        images = Path(opts.output_dir) / "images" / res.image_key
        previous = Path(opts.previous_dir) / "images" / res.image_key if opts.previous_dir else None
        for t in used.values():
            name = f"step_{t.turn:04d}_grid.png"
            dest = images / name
            try:
                res.images_copied += _copy_frame(t.frame, dest, previous / name if previous else None)
            except OSError as exc:  # never fall back to the source path silently
                raise ConvertError(
                    f"{opts.previous_dir or opts.output_dir}/images/{res.image_key}/{name}: cannot write the image "
                    f"copy ({exc.strerror or exc}) (check free disk space and permissions of --output_dir)"
                ) from None
    return res


def split_of(session_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic split by session id: sessions ordered by a seeded hash, exact counts per split.

    At least one session goes to val/test when its fraction is > 0 and there are >= 3 sessions."""
    order = sorted(session_ids, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(order)

    def count(frac: float) -> int:
        return 0 if frac <= 0 else max(1 if n >= 3 else 0, round(n * frac))

    n_test, n_val = count(test_fraction), count(val_fraction)
    out = {s: "test" for s in order[:n_test]}
    out.update({s: "val" for s in order[n_test : n_test + n_val]})
    out.update({s: "train" for s in order[n_test + n_val :]})
    return out


def _stderr_warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


@dataclass
class Tally:
    """What the conversion has seen so far: per-session counters only (the records go straight to the
    file), problems as they come (raised at once with `strict`), and the summary they make."""

    strict: bool = False
    warn: Callable[[str], None] = _stderr_warn
    used: list[tuple[str, int, Counter, Counter]] = field(default_factory=list)  # id, windows, labels, contexts
    seen_ids: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    sessions_skipped: Counter = field(default_factory=Counter)
    window_skips: Counter = field(default_factory=Counter)
    problems_by_reason: Counter = field(default_factory=Counter)
    problem_items: list[dict[str, str]] = field(default_factory=list)
    versions: Counter = field(default_factory=Counter)
    digests: set[bytes] = field(default_factory=set)
    totals: Counter = field(default_factory=Counter)
    warned: int = 0

    @property
    def produced(self) -> int:
        return self.totals["produced"]

    def note_problem(self, p: Problem) -> None:
        self.problems_by_reason[p.reason] += 1
        if len(self.problem_items) < MAX_PROBLEMS_IN_SUMMARY:
            self.problem_items.append(p.to_dict())
        if self.strict:
            raise ConvertError(f"{p.line()} ({hint(p.reason)})")
        if self.warned < MAX_WARNINGS_PRINTED:
            self.warn(f"{p.line()} ({hint(p.reason)})")
        elif self.warned == MAX_WARNINGS_PRINTED:
            self.warn("more problems not printed; see summary.json")
        self.warned += 1

    def add(self, res: SessionResult, images_dir: Path) -> list[str]:
        """Count one session's result; returns the record lines to keep (none for a skipped session)."""
        for key in ("n_turns", "frames_checked", "images_copied", "candidates"):
            self.totals[key] += getattr(res, key)
        self.window_skips.update(res.window_skips)
        if res.version:
            self.versions[res.version] += 1
        for p in res.problems:
            self.note_problem(p)
        if res.lines and res.session_id in self.seen_ids:
            p = Problem(
                res.dir,
                "duplicate_session_id",
                f"session_id {res.session_id} already read from {self.seen_ids[res.session_id]}",
            )
            self.note_problem(p)
            res.skip_reason, res.skip_detail = p.reason, p.detail
            self.totals["duplicates_removed"] += len(res.lines)
            shutil.rmtree(images_dir / res.image_key, ignore_errors=True)
            res.lines = []
        if not res.lines:
            self.sessions_skipped[res.skip_reason] += 1
            self.skipped.append(
                {
                    "session_id": res.session_id,
                    "path": res.dir,
                    "format_version": res.version,
                    "reason": res.skip_reason,
                    "detail": res.skip_detail,
                    "windows_skipped": dict(res.window_skips),
                }
            )
            return []
        self.seen_ids[res.session_id] = res.dir
        for d in res.window_digests:
            self.totals["identical_frame_windows"] += d in self.digests
            self.digests.add(d)
        self.used.append((res.session_id, len(res.lines), Counter(res.labels), Counter(res.contexts)))
        self.totals["produced"] += len(res.lines)
        return res.lines

    def summary(self, assignment: dict[str, str], sessions_found: int) -> dict[str, Any]:
        splits = {s: {"sessions": 0, "windows": 0, "labels": Counter(), "contexts": Counter()} for s in SPLITS}
        for sid, n, labels, contexts in self.used:
            st = splits[assignment[sid]]
            st["sessions"] += 1
            st["windows"] += n
            st["labels"].update(labels)
            st["contexts"].update(contexts)
        t = self.totals

        def ranked(counter: Counter) -> dict[str, int]:
            return dict(counter.most_common())

        return {
            "sessions": {
                "found": sessions_found,
                "used": len(self.used),
                "skipped": len(self.skipped),
                "skipped_by_reason": ranked(self.sessions_skipped),
                "format_versions": dict(sorted(self.versions.items())),
            },
            "skipped_sessions": self.skipped,
            "turns": t["n_turns"],
            "frames_checked": t["frames_checked"],
            "images_copied": t["images_copied"],
            "windows": {
                "candidates": t["candidates"],
                "produced": t["produced"],
                "duplicates_removed": t["duplicates_removed"],
                "skipped": sum(self.window_skips.values()),
                "skipped_by_reason": ranked(self.window_skips),
                "identical_frame_windows": t["identical_frame_windows"],
                "note": "candidates = produced + duplicates_removed + skipped; identical_frame_windows (same 4 frame "
                "files' bytes as an earlier window, e.g. a shared save state) are kept and only counted",
            },
            "labels": ranked(sum((s["labels"] for s in splits.values()), Counter())),
            "contexts": ranked(sum((s["contexts"] for s in splits.values()), Counter())),
            "splits": {
                s: {
                    "sessions": v["sessions"],
                    "windows": v["windows"],
                    "labels": ranked(v["labels"]),
                    "contexts": ranked(v["contexts"]),
                }
                for s, v in splits.items()
            },
            "problems": {
                "count": sum(self.problems_by_reason.values()),
                "by_reason": ranked(self.problems_by_reason),
                "items": self.problem_items,
            },
        }


# Everything a conversion writes into --output_dir: replaced together, never mixed with an older run's.
OUTPUT_NAMES = (FULL_NAME, *(f"{s}.jsonl" for s in SPLITS), "images", "summary.json")


@contextmanager
def _session_results(session_dirs: list[Path], opts: ConvertOptions, workers: int) -> Iterator[Iterable[SessionResult]]:
    """Each session's SessionResult in folder order, from a process pool with `workers > 1`.

    On an error the pending sessions are cancelled and the running ones finish: multiprocessing.Pool's
    terminate() could deadlock here (a worker killed while the task thread held the queue lock; seen
    on a full disk under load), which hung the CLI instead of printing its one-line error."""
    work = partial(convert_session, opts=opts)
    if workers <= 1 or len(session_dirs) <= 1:
        yield map(work, session_dirs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        futures = [pool.submit(work, str(d)) for d in session_dirs]
        yield (f.result() for f in futures)  # ordered: output independent of workers
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def convert_corpus(
    eevee_data_dir: str | Path,
    output_dir: str | Path,
    *,
    min_frames: int = 4,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    max_gap_seconds: float = 60.0,
    copy_images: bool = False,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    history_in_context: bool = False,
    warn: Callable[[str], None] = _stderr_warn,
) -> dict[str, Any]:
    """Convert every session under `eevee_data_dir`; write the JSONL files and summary.json; return the summary.

    The whole output set (OUTPUT_NAMES) is written into a staging folder beside `output_dir` and moved
    in only when complete, so a failure (full disk, --strict, Ctrl-C) leaves the previous output as it
    was. Raises UsageError for bad options, ConvertError in strict mode at the first problem."""
    started = time.perf_counter()
    src, out = Path(eevee_data_dir), Path(output_dir)
    if not src.is_dir():
        raise UsageError(f"--eevee_data_dir {src} is not a folder")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError("--val_fraction and --test_fraction must be in [0, 1) and sum to less than 1")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    ConvertOptions(min_frames=min_frames).check()
    runs_dir = find_runs_dir(src)
    session_dirs = list(iter_session_dirs(runs_dir))
    tally = Tally(strict=strict, warn=warn)
    with scratch_dir(out, "convert") as stage:
        opts = ConvertOptions(
            min_frames=min_frames,
            max_gap_seconds=max_gap_seconds,
            copy_images=copy_images,
            output_dir=str(stage),
            previous_dir=str(out.resolve()),
            history_in_context=history_in_context,
        )
        with (
            _session_results(session_dirs, opts, workers) as results,
            progress_bar(
                total=len(session_dirs), desc="converting sessions", unit="session", disable=not progress
            ) as bar,
            open(stage / FULL_NAME, "w", encoding="utf-8") as full,
        ):
            for res in results:
                lines = tally.add(res, stage / "images")
                if lines:
                    full.write("\n".join(lines) + "\n")
                bar.update(1)
                bar.set_postfix(windows=tally.produced, refresh=False)
        assignment = split_of([u[0] for u in tally.used], val_fraction, test_fraction, split_seed)
        if tally.used:
            _write_splits(stage, [(assignment[sid], n) for sid, n, _, _ in tally.used])
        else:
            (stage / FULL_NAME).unlink()
        summary = {
            "eevee_data_dir": str(src),
            "runs_dir": str(runs_dir),
            "output_dir": str(out),
            "options": {
                "min_frames": min_frames,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_seed": split_seed,
                "max_gap_seconds": max_gap_seconds,
                "copy_images": copy_images,
                "workers": workers,
                "strict": strict,
                "history_in_context": history_in_context,
            },
            **tally.summary(assignment, len(session_dirs)),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        atomic_write_json(stage / "summary.json", summary)
        move_entries(stage, out, OUTPUT_NAMES)
    return summary


def _write_splits(out: Path, runs: list[tuple[str, int]]) -> None:
    """Copy lines of the full file into train/val/test; `runs` = (split, n lines) per session, in file order."""
    with (
        open(out / FULL_NAME, encoding="utf-8") as full,
        open(out / "train.jsonl", "w", encoding="utf-8") as tr,
        open(out / "val.jsonl", "w", encoding="utf-8") as va,
        open(out / "test.jsonl", "w", encoding="utf-8") as te,
    ):
        sinks = {"train": tr, "val": va, "test": te}
        for split, n in runs:
            sink = sinks[split]
            for _ in range(n):
                sink.write(full.readline())


def summary_table(summary: dict[str, Any]):
    """A rich Table of the summary for the console."""
    from rich.table import Table

    table = Table(title=f"Eevee v1 → 4-frame JSONL ({summary['output_dir']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    s, w = summary["sessions"], summary["windows"]
    table.add_row("sessions found / used / skipped", f"{s['found']} / {s['used']} / {s['skipped']}")
    for reason, n in s["skipped_by_reason"].items():
        table.add_row(f"  session skipped: {reason}", str(n))
    table.add_row("format versions", ", ".join(f"{k} {v}" for k, v in s["format_versions"].items()) or "-")
    table.add_row("windows candidates / produced", f"{w['candidates']} / {w['produced']}")
    for reason, n in w["skipped_by_reason"].items():
        table.add_row(f"  window skipped: {reason}", str(n))
    table.add_row("duplicates removed", str(w["duplicates_removed"]))
    table.add_row("identical-frame windows (kept)", str(w["identical_frame_windows"]))
    for split, st in summary["splits"].items():
        table.add_row(f"{split}: sessions / windows", f"{st['sessions']} / {st['windows']}")
    table.add_row("labels", ", ".join(f"{k} {v}" for k, v in summary["labels"].items()) or "-")
    table.add_row("problems", ", ".join(f"{k} {v}" for k, v in summary["problems"]["by_reason"].items()) or "none")
    table.add_row("elapsed", f"{summary['elapsed_s']:.1f} s")
    return table


__all__ = [
    "ConvertError",
    "ConvertOptions",
    "FULL_NAME",
    "SessionResult",
    "UsageError",
    "build_context",
    "check_frame",
    "convert_corpus",
    "convert_session",
    "split_of",
    "summary_table",
]
