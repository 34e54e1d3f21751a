"""Eevee v1 → 4-frame JSONL converter: real reference windows, malformed inputs, leakage, splits."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from pokemon_gemma import dataset
from pokemon_gemma.convert import ConvertError, UsageError, convert_corpus, split_of
from pokemon_gemma.eevee import decision_buttons, read_session
from tests.conftest import REPO_ROOT, SHARED

SCRIPT = REPO_ROOT / "scripts" / "convert_eevee_data_v2.py"
REAL = SHARED / "data" / "eevee_real_dev"
LEGACY = SHARED / "data" / "eevee_legacy_examples"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def png(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (colour * 40 % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


def v3_turn(turn: int, ts: datetime, button="up", *, parsed="default", reasoning=None) -> dict:
    if parsed == "default":
        parsed = {
            "button_presses": [button] if isinstance(button, str) else button,
            "reasoning": reasoning or f"REASON-{turn}: walk towards the door, it is {button} of me",
            "observations": f"OBSERVED-{turn}: a path and a door",
            "context_detected": "navigation",
            "confidence": "high",
        }
    return {
        "turn": turn,
        "timestamp": ts.isoformat(),
        "ai_analysis": {
            "parsed_json": parsed,
            "raw_text": "```json\n" + json.dumps(parsed) + "\n```",
            "parsing_success": parsed is not None,
        },
        "button_presses": (parsed or {}).get("button_presses", ["b"]),
        "action_result": True,
        "screenshot_path": f"screenshot_{turn}.png",
        "execution_time": (ts - timedelta(seconds=0.5)).isoformat(),
        "template_used": "exploration_strategy",
        "template_version": "6.3",
        "visual_analysis": {"scene_type": "navigation"},
        "strategic_context": None,
        "memory_context": None,
    }


def write_session(
    runs: Path,
    sid: str,
    n: int = 6,
    *,
    buttons=("up", "right", "down", "left", "a", "b"),
    gap: float = 11.0,
    turns=None,
    data=None,
    frames=True,
    dirname=None,
) -> Path:
    """A V3 session folder (the real writer's shape); `turns`/`data` replace the generated parts."""
    d = runs / (dirname or f"session_{sid}")
    (d / "sshots").mkdir(parents=True, exist_ok=True)
    start = datetime(2025, 6, 27, 10, 0, 0)
    if turns is None:
        turns = [
            v3_turn(t, start + timedelta(seconds=gap * t), buttons[(t - 1) % len(buttons)]) for t in range(1, n + 1)
        ]
    if data is None:
        data = {
            "session_metadata": {
                "session_id": sid,
                "goal": "reach the door",
                "start_time": start.isoformat(),
                "status": "running",
                "total_turns": n,
                "successful_turns": n,
                "fine_tuning_eligible": 0,
            },
            "session_id": sid,
            "goal": "reach the door",
            "start_time": start.isoformat(),
            "turns": turns,
            "enhanced_turns": [],
        }
    if frames:
        for t in range(1, n + 1):
            (d / "sshots" / f"step_{t:04d}_grid.png").write_bytes(png(t))
    (d / "session_data.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return d


# --------------------------------------------------------------------------------------------
# (b) malformed corpus: one session per failure kind; name -> reason code the summary must give


def _build_malformed(runs: Path) -> dict[str, str]:
    start = datetime(2025, 6, 27, 10, 0, 0)
    at = lambda t, g=11.0: start + timedelta(seconds=g * t)  # noqa: E731
    expected = {}

    def bad(name: str, reason: str, **kw) -> Path:
        expected[f"session_{name}"] = reason
        return write_session(runs, name, **kw)

    good = write_session(runs, "20250601_000000")
    d = bad("20250601_000001", "invalid_json")
    (d / "session_data.json").write_text((good / "session_data.json").read_text()[:300])
    bad("20250601_000002", "wrong_type", data={"session_id": "20250601_000002", "goal": "g", "turns": {"1": {}}})
    d = bad("20250601_000003", "corrupt_frame")
    for p in (d / "sshots").iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    d = bad("20250601_000004", "missing_frame")
    (d / "sshots" / "step_0003_grid.png").unlink()
    bad("20250601_000005", "empty_session", n=0)
    d = bad("20250601_000006", "no_session_data")
    (d / "session_data.json").unlink()
    bad("20250601_000007", "unexpected_fields", turns=[{**v3_turn(t, at(t)), "mystery_key": 1} for t in range(1, 7)])
    bad("20250601_000008", "invalid_buttons_only", turns=[v3_turn(t, at(t), ["jump", "FLY"]) for t in range(1, 7)])
    bad(
        "20250601_000009",
        "pathfinding_no_buttons",
        turns=[
            v3_turn(
                t,
                at(t),
                parsed={
                    "pathfinding_action": "move_to_coordinate",
                    "target_x": 3,
                    "target_y": 4,
                    "reasoning": "go there",
                    "confidence": "high",
                },
            )
            for t in range(1, 7)
        ],
    )
    bad("20250601_000010", "no_parsed_decision", turns=[v3_turn(t, at(t), parsed=None) for t in range(1, 7)])
    v1 = [
        {
            "turn": t,
            "timestamp": at(t).isoformat(),
            "ai_analysis": "I think moving up is best.",
            "button_presses": ["up"],
            "action_result": True,
            "screenshot_path": f"screenshot_{t}.png",
            "execution_time": 0.0,
        }
        for t in range(1, 7)
    ]
    bad(
        "20250601_000011",
        "no_parsed_decision",
        data={"session_id": "20250601_000011", "goal": "g", "start_time": at(0).isoformat(), "turns": v1},
    )
    bad("20250601_000012", "time_gap", gap=200.0)
    bad("20250601_000013", "wrong_type", turns=["turn one", "turn two", "turn three", "turn four", "x", "y"])
    d = bad("20250601_000014", "empty_file")
    (d / "session_data.json").write_text("")
    bad("20250601_000015", "unrecognised_format", data={"run": "20250601_000015", "steps": []})
    bad(
        "20250601_000016",
        "bad_timestamp",
        turns=[{**v3_turn(t, at(t)), "timestamp": "yesterday", "execution_time": 0.0} for t in range(1, 7)],
    )
    bad("20250601_000017", "turn_order", turns=[v3_turn(t, at(7 - t)) for t in (6, 5, 4, 3, 2, 1)])
    bad("20250601_000018", "too_few_turns", n=2)
    d = bad("20250601_000019", "unreadable")
    (d / "session_data.json").write_bytes(b'{"goal": "\xff\xfe broken"}')
    bad(
        "20250601_000020",
        "wrong_type",
        turns=[{**v3_turn(t, at(t)), "ai_analysis": {"parsed_json": ["up"]}} for t in range(1, 7)],
    )
    bad(
        "20250601_000021",
        "duplicate_session_id",
        dirname="session_20250601_000021",
        data=json.loads((good / "session_data.json").read_text()),
    )
    v0 = {
        "goal": "g",
        "total_turns": 5,
        "max_turns": 50,
        "session_duration": 9.0,
        "final_status": "completed",
        "gameplay_history": [
            {
                "turn": t,
                "timestamp": at(t).isoformat(),
                "goal": "g",
                "ai_analysis": "free text",
                "button_presses": ["up"],
                "action_result": True,
                "screenshot_path": f"/nonexistent/eevee/analysis/eevee_context_{t}.png",
                "execution_time": 2.0,
            }
            for t in range(1, 6)
        ],
    }
    d = bad("20250601_000022", "no_frames", data=v0, frames=False, dirname="20250601_000022_continuous")
    expected[d.name] = expected.pop("session_20250601_000022")
    # A V1 session whose string reply holds a ```json block is NOT bad: it converts.
    v1_ok = [
        {**turn, "ai_analysis": 'Reply:\n```json\n{"button_presses": ["LEFT"], "reasoning": "r"}\n```'} for turn in v1
    ]
    write_session(
        runs,
        "20250601_000030",
        data={"session_id": "20250601_000030", "goal": "g", "start_time": at(0).isoformat(), "turns": v1_ok},
    )
    return expected


@pytest.fixture(scope="module")
def malformed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    runs = tmp_path_factory.mktemp("malformed") / "runs"
    runs.mkdir()
    return runs, _build_malformed(runs)


def test_malformed_corpus_converts_good_sessions_and_reports_each_bad_one(malformed, tmp_path):
    runs, expected = malformed
    assert len(set(expected.values())) >= 15
    r = run_cli("--eevee_data_dir", runs.parent, "--output_dir", tmp_path, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    full = read_jsonl(tmp_path / "pokemon_4frame_dataset_full.jsonl")
    produced = {}
    for rec in full:
        produced.setdefault(rec["metadata"]["session_id"], []).append(rec)
    # the good V3 session and the V1 session whose string reply holds a ```json block convert; nothing else
    assert sorted(produced) == ["20250601_000000", "20250601_000030"]
    assert [r["metadata"]["turns"] for r in produced["20250601_000000"]] == [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]
    assert [dataset.parse_output(r["output"])["button"] for r in produced["20250601_000000"]] == ["left", "a", "b"]
    assert {dataset.parse_output(r["output"])["button"] for r in produced["20250601_000030"]} == {"left"}
    assert summary["sessions"]["found"] == len(expected) + 2
    assert summary["sessions"]["used"] == 2
    for rec in produced["20250601_000000"]:  # (c) on generated data: the target's own text stays out of context
        target = rec["metadata"]["turns"][-1]
        assert f"REASON-{target}" in rec["output"] and f"OBSERVED-{target}" in rec["output"]
        assert "REASON-" not in rec["context"] and "OBSERVED-" not in rec["context"]
        assert rec["context"].startswith("Goal: reach the door")
    reported: dict[str, set] = {}
    for item in summary["problems"]["items"]:
        name = next(
            part
            for part in Path(item["file"].split(":")[0]).parts
            if part.startswith("session_") or part.endswith("_continuous")
        )
        reported.setdefault(name, set()).update((item["reason"], item["detail"]))
    for name, reason in expected.items():
        assert name in reported, f"{name} ({reason}) not reported"
        assert any(reason in text for text in reported[name]), f"{name}: {reason} not in {reported[name]}"
    skipped = {Path(s["path"]).name for s in summary["skipped_sessions"]}
    assert skipped == set(expected), skipped ^ set(expected)
    w = summary["windows"]
    assert (
        w["candidates"]
        == w["produced"] + w["duplicates_removed"] + w["skipped"]
        == sum(w["skipped_by_reason"].values()) + w["produced"] + w["duplicates_removed"]
    )
    assert w["duplicates_removed"] == 3


@pytest.mark.parametrize(
    "kind",
    [
        "invalid_json",
        "wrong_type",
        "corrupt_frame",
        "missing_frame",
        "empty_session",
        "no_session_data",
        "unexpected_fields",
        "invalid_buttons_only",
        "pathfinding_no_buttons",
        "no_parsed_decision",
        "time_gap",
        "empty_file",
        "unrecognised_format",
        "bad_timestamp",
        "turn_order",
        "too_few_turns",
        "unreadable",
        "duplicate_session_id",
        "no_frames",
    ],
)
def test_strict_fails_on_each_malformed_kind(malformed, tmp_path, kind):
    runs, expected = malformed
    name = next(n for n, r in expected.items() if r == kind)
    only = tmp_path / "runs"
    only.mkdir()
    (only / "session_20250601_000000").symlink_to(runs / "session_20250601_000000")  # the good one goes first
    (only / name).symlink_to(runs / name)
    r = run_cli("--eevee_data_dir", only, "--output_dir", tmp_path / "out", "--strict")
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and name in line and kind in line, line
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl").exists()
    # without --strict the good session converts
    assert run_cli("--eevee_data_dir", only, "--output_dir", tmp_path / "out2").returncode == 0


def test_labels_case_select_and_first_valid_button():
    assert decision_buttons({"button_presses": ["SELECT", "a"]})[0] == ["select", "a"]
    assert decision_buttons({"button_presses": ["jump", "Left", "up"]})[0] == ["left", "up"]
    assert decision_buttons({"button_presses": []})[2] == "empty_button_presses"
    assert decision_buttons({"pathfinding_action": "move_to_coordinate"})[2] == "pathfinding_no_buttons"
    assert decision_buttons({"button_presses": "up"})[2] == "button_presses_not_a_list"
    assert decision_buttons(None)[2] == "no_parsed_decision"


def test_hole_in_turn_numbers_keeps_window_and_min_frames_pads(tmp_path):
    start = datetime(2025, 6, 27, 10, 0, 0)
    turns = [
        v3_turn(t, start + timedelta(seconds=11 * t), b)
        for t, b in [(1, "up"), (2, "SELECT"), (3, "down"), (5, "left"), (6, "a")]
    ]
    d = write_session(tmp_path / "runs", "20250701_000000", n=6, turns=turns)
    (d / "sshots" / "step_0004_grid.png").unlink()  # turn 4 was never recorded
    s = convert_corpus(tmp_path, tmp_path / "out", progress=False, val_fraction=0, test_fraction=0)
    recs = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["metadata"]["turns"] for r in recs] == [[1, 2, 3, 5], [2, 3, 5, 6]]
    assert recs[0]["metadata"]["previous_buttons"] == ["up", "select", "down"]
    assert s["windows"]["produced"] == 2
    s = convert_corpus(tmp_path, tmp_path / "out1", progress=False, min_frames=1, val_fraction=0, test_fraction=0)
    recs = read_jsonl(tmp_path / "out1" / "train.jsonl")
    assert [r["metadata"]["turns"] for r in recs][:2] == [[1, 1, 1, 1], [1, 1, 1, 2]]
    assert recs[0]["metadata"]["previous_buttons"] == [None, None, None]
    assert recs[1]["frames"][:3] == [recs[1]["frames"][0]] * 3 and recs[1]["metadata"]["padded_frames"] == 2
    assert [dataset.parse_output(r["output"])["button"] for r in recs] == ["up", "select", "down", "left", "a"]
    assert run_cli("--eevee_data_dir", tmp_path, "--output_dir", tmp_path / "o", "--min_frames", "5").returncode == 2
    with pytest.raises(UsageError):
        convert_corpus(tmp_path, tmp_path / "o", val_fraction=0.6, test_fraction=0.5, progress=False)


def test_strict_names_file_and_reason_in_process(malformed, tmp_path):
    runs, _ = malformed
    # folders are read in sorted order: the legacy `*_continuous` one comes first
    with pytest.raises(ConvertError, match=r"runs/20250601_000022_continuous: no_frames: none of 5 turns"):
        convert_corpus(runs, tmp_path, strict=True, progress=False)
    assert not (tmp_path / "summary.json").exists()
    only = tmp_path / "only" / "runs"
    only.mkdir(parents=True)
    (only / "session_20250601_000001").symlink_to(runs / "session_20250601_000001")
    with pytest.raises(ConvertError, match=r"session_20250601_000001/session_data\.json:\d+: invalid_json"):
        convert_corpus(only, tmp_path / "o", strict=True, progress=False)


def test_legacy_v0_examples_never_crash(tmp_path):
    if not LEGACY.is_dir():
        pytest.skip(f"{LEGACY} not found beside the checkout; legacy-format test skipped")
    for sub in sorted(p for p in LEGACY.iterdir() if p.is_dir()):
        out = tmp_path / sub.name
        r = run_cli("--eevee_data_dir", sub, "--output_dir", out)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # nothing convertible: no frames survive
        assert "no window could be converted" in r.stderr
        summary = json.loads((out / "summary.json").read_text())
        s = summary["sessions"]
        assert s["found"] >= 1 and s["used"] == 0 and sum(s["skipped_by_reason"].values()) == s["found"]
        assert set(s["skipped_by_reason"]) <= {"no_frames", "empty_session", "too_few_turns", "no_session_data"}


# --------------------------------------------------------------------------------------------
# (a) real runs: exactly the 489 reference windows


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not REAL.is_dir():
        pytest.skip(f"{REAL} not found (../shared/data/eevee_real_dev beside the checkout); real-data tests skipped")
    out = tmp_path_factory.mktemp("real_out")
    r = run_cli("--eevee_data_dir", REAL, "--output_dir", out, "--copy_images", "--strict")
    assert r.returncode == 0, r.stderr
    return out


def test_real_runs_produce_exactly_the_reference_windows(real):
    ref = {(r["session_id"], tuple(r["turns"])): r for r in read_jsonl(REAL / "reference_labels.jsonl")}
    assert len(ref) == 489
    full = read_jsonl(real / "pokemon_4frame_dataset_full.jsonl")
    got = {(r["metadata"]["session_id"], tuple(r["metadata"]["turns"])): r for r in full}
    assert len(got) == len(full)
    assert set(got) == set(ref), (set(got) - set(ref), set(ref) - set(got))
    for key, row in ref.items():
        rec = dataset.record_from_dict(got[key], str(key), real)
        md = rec.metadata
        assert rec.button == row["button"], key
        assert (md["context"], md["template_used"], md["confidence"]) == (
            row["context"],
            row["template_used"],
            row["confidence"],
        ), key
        assert rec.question == dataset.QUESTION
        assert len(md["previous_buttons"]) == 3
        assert all(Path(f).is_file() for f in rec.frames)
    summary = json.loads((real / "summary.json").read_text())
    w = summary["windows"]
    assert w["produced"] == 489 and w["duplicates_removed"] == 0
    assert w["candidates"] == 489 + w["skipped"] == 489 + sum(w["skipped_by_reason"].values())
    # every skipped window ends on a placeholder turn (parsed_json null)
    placeholders = 0
    for sdir in sorted((REAL / "runs").iterdir()):
        turns = read_session(sdir).turns
        placeholders += sum(1 for t in turns[3:] if t.decision is None)
    assert w["skipped_by_reason"] == {"no_parsed_decision": placeholders}
    assert summary["labels"] == {"a": 162, "up": 138, "right": 75, "down": 46, "b": 41, "left": 23, "start": 4}


def test_real_copy_images_once_with_relative_paths(real):
    full = read_jsonl(real / "pokemon_4frame_dataset_full.jsonl")
    frames = {f for r in full for f in r["frames"]}
    assert all(f.startswith("images/") and f.endswith("_grid.png") for f in frames)
    on_disk = {str(p.relative_to(real)) for p in (real / "images").rglob("*.png")}
    assert on_disk == frames
    summary = json.loads((real / "summary.json").read_text())
    assert summary["images_copied"] == len(frames)
    first = full[0]
    src = REAL / "runs" / f"session_{first['metadata']['session_id']}" / "sshots" / Path(first["frames"][-1]).name
    assert (real / first["frames"][-1]).read_bytes() == src.read_bytes()


def _target_texts(sdir: Path) -> dict[int, tuple[str, str]]:
    return {t.turn: (t.reasoning, t.observations) for t in read_session(sdir).turns if t.turn is not None}


def test_context_never_contains_target_reasoning_or_observations(real, tmp_path):
    convert_corpus(REAL, tmp_path, history_in_context=True, progress=False)
    with_history = read_jsonl(tmp_path / "pokemon_4frame_dataset_full.jsonl")
    assert sum("Previous buttons" in r["context"] for r in with_history) == 489
    full = read_jsonl(real / "pokemon_4frame_dataset_full.jsonl")
    assert all(r["context"] == f"Goal: {r['metadata']['session_goal']}" for r in full)  # default: goal only
    cache: dict[str, dict] = {}
    for rec in full + with_history:
        sid, turns = rec["metadata"]["session_id"], rec["metadata"]["turns"]
        texts = cache.setdefault(sid, _target_texts(REAL / "runs" / f"session_{sid}"))
        reasoning, observations = texts[turns[-1]]
        out = json.loads(rec["output"])
        assert out["reasoning"] == reasoning  # the target text is in the answer ...
        for text in filter(None, (reasoning, observations)):
            for k in range(0, max(1, len(text) - 40), 40):  # ... and no 40-char piece of it is in the context
                piece = text[k : k + 40]
                if piece not in rec["metadata"]["session_goal"]:  # the goal may be allowed to repeat it
                    assert piece not in rec["context"], (sid, turns, piece)
        assert rec["metadata"]["session_goal"] in rec["context"]


def test_splits_are_deterministic_disjoint_and_complete(real, tmp_path):
    full = (real / "pokemon_4frame_dataset_full.jsonl").read_text().splitlines()
    parts = {s: (real / f"{s}.jsonl").read_text().splitlines() for s in ("train", "val", "test")}
    assert sorted(full) == sorted(parts["train"] + parts["val"] + parts["test"])
    ids = {s: {json.loads(x)["metadata"]["session_id"] for x in lines} for s, lines in parts.items()}
    assert all(ids[s] for s in ids)  # 31 sessions: every split non-empty
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    summary = json.loads((real / "summary.json").read_text())
    assert {s: summary["splits"][s]["windows"] for s in parts} == {s: len(v) for s, v in parts.items()}
    # same seed (and 2 workers, absolute paths) -> same assignment; another seed -> another one
    convert_corpus(REAL, tmp_path / "again", copy_images=True, workers=2, progress=False)
    for s in parts:
        assert (tmp_path / "again" / f"{s}.jsonl").read_text().splitlines() == parts[s]
    other = split_of(sorted(ids["train"] | ids["val"] | ids["test"]), 0.1, 0.1, seed=1)
    assert {k for k, v in other.items() if v == "test"} != ids["test"]


def test_demo_sessions_convert_completely(tmp_path):
    from pokemon_gemma.demo import write_demo_sessions

    manifest = write_demo_sessions(tmp_path / "demo", sessions=3, seed=0)
    r = run_cli("--eevee_data_dir", tmp_path / "demo", "--output_dir", tmp_path / "out", "--strict")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["windows"]["produced"] == manifest["turns"] - 3 * 3 and summary["windows"]["skipped"] == 0
    assert summary["sessions"]["format_versions"] == {"V3": 3}
    for rec in read_jsonl(tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl"):
        assert rec["context"] == f"Goal: {rec['metadata']['session_goal']}"


def test_full_disk_is_one_line_and_the_previous_output_stays(tmp_path):
    """Converting into a full file system: a one-line error naming the disk problem, and the previous
    output set (JSONL, summary, images) is left exactly as it was, with no staging folder behind."""
    from tests.helpers import fill_disk, small_tmpfs

    for i in range(3):
        write_session(tmp_path / "runs", f"20250701_00000{i}")
    with small_tmpfs(tmp_path / "disk", size_kb=1024) as disk:
        out = disk / "out"
        assert run_cli("--eevee_data_dir", tmp_path, "--output_dir", out, "--copy_images").returncode == 0
        before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert any(str(k).startswith("images/") for k in before) and Path("train.jsonl") in before
        for i in range(3, 8):
            write_session(tmp_path / "runs", f"20250701_00000{i}")
        fill_disk(disk, leave_bytes=8 * 1024)
        r = run_cli("--eevee_data_dir", tmp_path, "--output_dir", out, "--copy_images", "--workers", "2")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and "No space left on device" in line and "free disk space" in line, line
        after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert after == before
        assert sorted(p.name for p in disk.iterdir()) == [".filler", "out"]  # no staging folder left behind


# --------------------------------------------------------------------------------------------
# hostile input: session files built to crash a parser, frames built to exhaust memory

HOSTILE_SESSIONS = {
    "deep_nesting": '{"session_id": "x", "turns": ' + "[" * 5000 + "]" * 5000 + "}",
    "huge_number": '{"session_id": "x", "goal": "g", "turns": [{"turn": ' + "9" * 5000 + "}]}",
}


@pytest.mark.parametrize(
    "kind, flags",
    [
        ("deep_nesting", []),
        ("huge_number", []),
        ("deep_nesting", ["--workers", "2"]),
        ("huge_number", ["--workers", "2"]),
        ("deep_nesting", ["--strict"]),
    ],
    ids=["deep", "number", "deep-workers2", "number-workers2", "deep-strict"],
)
def test_hostile_session_file_is_skipped_and_counted_not_a_crash(tmp_path, kind, flags):
    """A session_data.json nested 5000 deep or holding a 5000-digit number is one skipped session
    (invalid_json, counted, warned about) and the rest converts; with --strict it is a one-line error."""
    runs = tmp_path / "runs"
    write_session(runs, "20250801_000000")
    bad = write_session(runs, "20250801_000001", data=HOSTILE_SESSIONS[kind])
    write_session(runs, "20250801_000002")
    r = run_cli("--eevee_data_dir", tmp_path, "--output_dir", tmp_path / "out", *flags)
    assert "Traceback" not in r.stderr, r.stderr
    if "--strict" in flags:
        assert r.returncode == 1
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and str(bad / "session_data.json") in line and "invalid_json" in line, line
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        return
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sessions"]["found"] == 3 and summary["sessions"]["used"] == 2
    assert summary["sessions"]["skipped_by_reason"] == {"invalid_json": 1}
    (skipped,) = summary["skipped_sessions"]
    assert skipped["path"] == str(bad) and skipped["reason"] == "invalid_json"
    assert ("nested too deeply" if kind == "deep_nesting" else "4300 digits") in skipped["detail"]
    assert f"{bad / 'session_data.json'}: invalid_json" in r.stderr  # the one-line warning
    assert summary["windows"]["produced"] == 6


def test_decompression_bomb_frame_is_rejected_and_counted(tmp_path):
    """A 109 KB PNG declaring 30000x30000 pixels is never decoded: its windows are skipped as
    oversized_frame (counted, warned about), the other frames convert; --strict names the file."""
    from tests.helpers import bomb_png

    runs = tmp_path / "runs"
    write_session(runs, "20250802_000000")
    d = write_session(runs, "20250802_000001")
    bomb = bomb_png(d / "sshots" / "step_0006_grid.png")
    assert bomb.stat().st_size < 120_000
    r = run_cli("--eevee_data_dir", tmp_path, "--output_dir", tmp_path / "out")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"]["by_reason"] == {"oversized_frame": 1}
    assert summary["windows"]["skipped_by_reason"] == {"oversized_frame": 1}  # the window ending at turn 6
    assert summary["windows"]["produced"] == 3 + 2
    full = (tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl").read_text()
    assert str(bomb) not in full
    assert f"{bomb}: oversized_frame" in r.stderr
    strict = run_cli("--eevee_data_dir", tmp_path, "--output_dir", tmp_path / "strict", "--strict")
    line = strict.stderr.strip().splitlines()[-1]
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert line.startswith("error: ") and str(bomb) in line and "oversized_frame" in line, line
