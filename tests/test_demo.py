"""Demo session generator: format, determinism, expert policy read back from pixels, balance."""

import hashlib
import json
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pokemon_gemma import demo
from pokemon_gemma.demo import (
    DOOR,
    GRASS,
    GRID,
    PATH,
    ROOF,
    TILE_H,
    TILE_W,
    TREE,
    WALL,
    WATER,
    Scene,
    expert_button,
    generate_session,
    render,
    write_demo_sessions,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_demo_sessions.py"
V3_TURN_KEYS = {
    "turn",
    "timestamp",
    "ai_analysis",
    "button_presses",
    "action_result",
    "screenshot_path",
    "execution_time",
    "template_used",
    "template_version",
    "visual_analysis",
    "strategic_context",
    "memory_context",
}
TOP_KEYS = ["session_metadata", "session_id", "goal", "start_time", "turns", "enhanced_turns"]
METADATA_KEYS = {
    "session_id",
    "goal",
    "start_time",
    "status",
    "total_turns",
    "successful_turns",
    "fine_tuning_eligible",
}


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_sessions(out, sessions=6, seed=3)
    return out


# ---------------------------------------------------------------------------------- format


def test_same_seed_gives_identical_bytes_and_other_seed_differs(demo_dir, tmp_path):
    write_demo_sessions(tmp_path / "again", sessions=6, seed=3)
    write_demo_sessions(tmp_path / "other", sessions=6, seed=4)
    first = file_digests(demo_dir)
    assert len(first) > 6 * 8 * 2  # session_data + frames + analyses
    assert file_digests(tmp_path / "again") == first
    other = file_digests(tmp_path / "other")
    assert other != first
    # The first sessions do not depend on how many are generated.
    write_demo_sessions(tmp_path / "fewer", sessions=2, seed=3)
    fewer = file_digests(tmp_path / "fewer" / "runs")
    assert fewer and all(first["runs/" + k] == v for k, v in fewer.items())


def test_layout_and_keys_match_real_v3_runs(demo_dir):
    sessions = sorted((demo_dir / "runs").iterdir())
    assert len(sessions) == 6
    for sdir in sessions:
        assert re.fullmatch(r"session_\d{8}_\d{6}", sdir.name), sdir.name
        data = json.loads((sdir / "session_data.json").read_text())
        assert list(data) == TOP_KEYS
        md = data["session_metadata"]
        assert set(md) == METADATA_KEYS
        assert md["session_id"] == data["session_id"] == sdir.name[len("session_") :]
        assert md["total_turns"] == md["successful_turns"] == len(data["turns"]) >= 8
        assert data["goal"] == md["goal"] in demo.GOAL_SENTENCES
        previous = None
        for number, turn in enumerate(data["turns"], start=1):
            assert set(turn) == V3_TURN_KEYS
            assert turn["turn"] == number
            parsed = turn["ai_analysis"]["parsed_json"]
            assert list(parsed) == ["button_presses", "reasoning", "observations", "context_detected", "confidence"]
            assert parsed["button_presses"] == turn["button_presses"] and len(turn["button_presses"]) == 1
            assert parsed["button_presses"][0] in demo.DEMO_BUTTONS
            assert parsed["context_detected"] in ("navigation", "dialogue") and parsed["confidence"] == "high"
            assert json.loads(turn["ai_analysis"]["raw_text"].removeprefix("```json\n").removesuffix("\n```")) == parsed
            assert turn["screenshot_path"] == f"screenshot_{number}.png"
            ts = np.datetime64(turn["timestamp"])
            if previous is not None:
                gap = (ts - previous) / np.timedelta64(1, "s")
                assert 7 <= gap <= 13, gap  # ~10 s apart, like real LLM turns
            previous = ts
            frame = sdir / "sshots" / f"step_{number:04d}_grid.png"
            with Image.open(frame) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (240, 160))
            text = (sdir / f"step_{number:04d}_visual_analysis.txt").read_text()
            assert text.startswith(f"VISUAL ANALYSIS STEP {number}\n") and text.count("```json") == 2
        assert [e["turn_number"] for e in data["enhanced_turns"]] == [t["turn"] for t in data["turns"]]
        assert all(list(e) == list(demo.TURN_DATA_KEYS) for e in data["enhanced_turns"])
    manifest = json.loads((demo_dir / demo.MANIFEST).read_text())
    assert manifest["sessions"] == [p.name[len("session_") :] for p in sessions]


def test_keys_equal_those_of_a_real_v3_session(demo_dir, shared_dir):
    real = shared_dir / "data" / "eevee_real_dev" / "runs" / "session_20250626_150408" / "session_data.json"
    if not real.is_file():
        pytest.skip(f"{real} not found")
    real_data = json.loads(real.read_text())
    ours = json.loads(next((demo_dir / "runs").glob("session_*/session_data.json")).read_text())
    assert list(ours) == list(real_data)
    assert set(ours["session_metadata"]) == set(real_data["session_metadata"])
    assert set(ours["turns"][-1]) == set(real_data["turns"][-1])
    assert set(ours["turns"][-1]["ai_analysis"]) == set(real_data["turns"][-1]["ai_analysis"])
    assert list(ours["enhanced_turns"][0]) == list(real_data["enhanced_turns"][0])


# ---------------------------------------------------------------------------------- policy


def open_world(player, facing, goal, kind="npc", pages=()) -> Scene:
    tiles = np.full((GRID, GRID), GRASS, dtype=np.int8)
    scene = Scene(tiles=tiles, player=player, facing=facing, goal_kind=kind, goal=goal, pages=list(pages))
    if kind == "door":
        gx, gy = goal
        for x, y in ((gx, gy - 1), (gx + 1, gy - 1)):
            tiles[y, x] = ROOF
        tiles[gy, gx + 1] = WALL
        tiles[gy, gx] = DOOR
    return scene


@pytest.mark.parametrize(
    "player,facing,goal,kind,expected",
    [
        ((1, 4), "right", (4, 4), "npc", "right"),  # straight ahead
        ((1, 1), "right", (4, 4), "npc", "down"),  # both axes shortest: the one across the facing
        ((1, 1), "down", (4, 4), "npc", "right"),  # ... zig-zag the other way
        ((3, 4), "right", (4, 4), "npc", "a"),  # adjacent and facing
        ((3, 4), "up", (4, 4), "npc", "right"),  # adjacent, turn to face
        ((4, 5), "left", (4, 4), "npc", "up"),
        ((2, 4), "up", (2, 3), "door", "a"),  # below the door, facing it
        ((2, 4), "right", (2, 3), "door", "up"),
        ((3, 4), "up", (2, 3), "door", "left"),  # beside the door's stand tile
        ((6, 1), "left", (2, 3), "door", "down"),
    ],
)
def test_expert_follows_shortest_path_zigzag_and_interacts(player, facing, goal, kind, expected):
    assert expert_button(open_world(player, facing, goal, kind)) == expected


def test_expert_walks_around_obstacles_and_answers_dialogue():
    scene = open_world((4, 4), "up", (4, 1))
    scene.tiles[3, 1:7] = TREE  # a hedge with gaps at x=0 and x=7 between player and villager
    assert expert_button(scene) == "right"  # up is blocked; the right gap is 2 steps shorter
    scene.facing = "right"
    assert expert_button(scene) == "right"
    scene.tiles[3, 7] = WATER
    assert expert_button(scene) == "left"  # the right gap is closed: round the left end
    assert expert_button(open_world((1, 1), "up", (4, 4), pages=["text"])) == "a"
    assert expert_button(open_world((1, 1), "up", (4, 4), pages=["question"])) == "b"


def read_scene(frame: np.ndarray) -> Scene:
    """Rebuild the scene from pixels alone (what a perfect vision model could see)."""
    c = demo._C

    def has(tile, color):
        return bool((tile == np.array(color, np.uint8)).all(axis=2).any())

    if (frame[128:152, 8:232] == np.array(c["box"], np.uint8)).all(axis=2).mean() > 0.5:
        menu = (frame[66:110, 186:236] == np.array(c["box"], np.uint8)).all(axis=2).mean() > 0.5
        scene = Scene(np.zeros((GRID, GRID), np.int8), (0, 0), "up")
        scene.pages = ["question" if menu else "text"]
        return scene
    tiles = np.full((GRID, GRID), GRASS, dtype=np.int8)
    player = goal = facing = kind = None
    for y in range(GRID):
        for x in range(GRID):
            tile = frame[y * TILE_H : (y + 1) * TILE_H, x * TILE_W : (x + 1) * TILE_W]
            if has(tile, c["player"]):
                player = (x, y)
                ys, xs = np.nonzero((tile == np.array(c["facing"], np.uint8)).all(axis=2))
                cy, cx = ys.mean() / TILE_H - 0.5, xs.mean() / TILE_W - 0.5
                facing = ("down" if cy > 0 else "up") if abs(cy) > abs(cx) else ("right" if cx > 0 else "left")
                tiles[y, x] = PATH if has(tile, c["path"]) else GRASS
            elif has(tile, c["npc"]):
                goal, kind = (x, y), "npc"
            elif has(tile, c["door"]):
                goal, kind = (x, y), "door"
                tiles[y, x] = DOOR
            elif has(tile, c["roof"]):
                tiles[y, x] = ROOF
            elif has(tile, c["window"]):
                tiles[y, x] = WALL
            elif has(tile, c["canopy"]):
                tiles[y, x] = TREE
            elif has(tile, c["water"]):
                tiles[y, x] = WATER
            elif has(tile, c["path"]):
                tiles[y, x] = PATH
    assert player and goal, "player and goal must be visible on every navigation frame"
    return Scene(tiles, player, facing, kind, goal)


@pytest.mark.parametrize("variant", ["default", "paths+grid"])
def test_every_label_is_the_expert_button_of_its_last_frame_read_from_pixels(demo_dir, tmp_path, variant):
    if variant != "default":
        demo_dir = tmp_path / "variant"
        write_demo_sessions(demo_dir, sessions=6, seed=3, paths=2, grid_lines=True)
    checked = Counter()
    for sdir in sorted((demo_dir / "runs").iterdir()):
        data = json.loads((sdir / "session_data.json").read_text())
        for turn in data["turns"]:
            frame = np.asarray(Image.open(sdir / "sshots" / f"step_{turn['turn']:04d}_grid.png").convert("RGB"))
            label = turn["button_presses"][0]
            assert expert_button(read_scene(frame)) == label, f"{sdir.name} turn {turn['turn']}"
            checked[label] += 1
    assert set(checked) == set(demo.DEMO_BUTTONS), checked  # every kind of decision was exercised


def test_render_draws_player_facing_and_dialogue_boxes():
    scene = open_world((2, 5), "left", (6, 1))
    frame = render(scene)
    assert frame.shape == (160, 240, 3) and frame.dtype == np.uint8
    back = read_scene(frame)
    assert (back.player, back.facing, back.goal, back.goal_kind) == ((2, 5), "left", (6, 1), "npc")
    for facing in ("up", "down", "right"):
        scene.facing = facing
        assert read_scene(render(scene)).facing == facing
    scene.pages = ["text"]
    assert read_scene(render(scene)).dialogue == "text"
    scene.pages = ["question"]
    assert read_scene(render(scene)).dialogue == "question"


# ---------------------------------------------------------------------------------- text vs labels, balance


def windows(n_sessions: int, seed: int = 11):
    """(goal sentence, previous button, button) of every 4-turn window a converter would make."""
    rows = []
    for index in range(n_sessions):
        session = generate_session(seed, index)
        buttons = [t.button for t in session.turns]
        rows += [(session.goal, buttons[k - 1], buttons[k]) for k in range(3, len(buttons))]
    return rows


@pytest.fixture(scope="module")
def many_windows():
    rows = windows(60)
    assert len(rows) >= 300
    return rows


def test_goal_sentence_does_not_determine_the_label(many_windows):
    by_goal = defaultdict(Counter)
    for goal, _, button in many_windows:
        by_goal[goal][button] += 1
    assert len(by_goal) >= 4
    assert all(len(counts) >= 4 for counts in by_goal.values()), by_goal  # each goal is shared across labels
    overall = Counter(b for _, _, b in many_windows).most_common(1)[0][1] / len(many_windows)
    text_only = sum(c.most_common(1)[0][1] for c in by_goal.values()) / len(many_windows)
    assert text_only < overall + 0.08, (text_only, overall)


def test_turn_text_outside_the_target_fields_is_constant(demo_dir):
    seen = set()
    for path in (demo_dir / "runs").glob("session_*/session_data.json"):
        for turn in json.loads(path.read_text())["turns"]:
            seen.add(json.dumps([turn["visual_analysis"], turn["template_used"], turn["template_version"]]))
    assert len(seen) == 1  # no per-turn scene type or template hinting at the button


def test_labels_are_balanced(many_windows):
    labels = Counter(b for _, _, b in many_windows)
    majority = labels.most_common(1)[0][1] / len(many_windows)
    repeat_last = sum(prev == b for _, prev, b in many_windows) / len(many_windows)
    assert majority < 0.45 and repeat_last < 0.45, (labels, majority, repeat_last)
    assert min(labels[b] for b in demo.DEMO_BUTTONS) / len(many_windows) > 0.03


# ---------------------------------------------------------------------------------- CLI


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_refuses_to_mix_and_overwrites_only_its_own_output(tmp_path):
    out = tmp_path / "demo"
    done = run_script("--output_dir", str(out), "--sessions", "3", "--seed", "1", "--max_turns", "10")
    assert done.returncode == 0, done.stderr
    assert "wrote 3 sessions" in done.stdout and "majority" in done.stdout
    assert len(list((out / "runs").glob("session_*/session_data.json"))) == 3
    again = run_script("--output_dir", str(out), "--sessions", "2")
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr
    replaced = run_script("--output_dir", str(out), "--sessions", "2", "--seed", "1", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert len(list((out / "runs").glob("session_*"))) == 2
    (out / "runs" / "session_20990101_000000").mkdir()  # a real run someone put there: never deleted
    foreign = run_script("--output_dir", str(out), "--sessions", "2", "--overwrite")
    assert foreign.returncode == 2 and "did not write" in foreign.stderr
    assert (out / "runs" / "session_20990101_000000").is_dir()
    bad = run_script("--output_dir", str(out), "--sessions", "2", "--min_turns", "3")
    assert bad.returncode == 2 and "min_turns" in bad.stderr and "Traceback" not in bad.stderr


def test_turn_counts_follow_flags():
    rng = random.Random(0)
    for index in rng.sample(range(1000), 5):
        session = generate_session(5, index, min_turns=5, max_turns=6)
        assert 5 <= len(session.turns) <= 6
    with pytest.raises(ValueError):
        generate_session(5, 0, min_turns=3, max_turns=6)


def test_converted_windows_carry_the_expert_labels_and_stay_balanced(tmp_path):
    from pokemon_gemma.convert import convert_corpus

    write_demo_sessions(tmp_path / "demo", sessions=30, seed=2)
    convert_corpus(tmp_path / "demo", tmp_path / "out", progress=False, warn=lambda line: None)
    truth = {}
    for path in (tmp_path / "demo" / "runs").glob("session_*/session_data.json"):
        data = json.loads(path.read_text())
        truth.update({(data["session_id"], t["turn"]): t["button_presses"][0] for t in data["turns"]})
    rows = [json.loads(line) for line in (tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl").open()]
    assert len(rows) == len(truth) - 3 * 30  # every turn from the 4th on is a target
    repeats, labels = 0, Counter()
    for row in rows:
        md = row["metadata"]
        button = json.loads(row["output"])["button"]
        assert button == truth[(md["session_id"], md["turns"][-1])]
        assert md["previous_buttons"] == [truth[(md["session_id"], t)] for t in md["turns"][:-1]]
        assert button not in row["context"].replace(md["session_goal"], "").split()  # goal-only text
        repeats += md["previous_buttons"][-1] == button
        labels[button] += 1
    assert labels.most_common(1)[0][1] / len(rows) < 0.45 and repeats / len(rows) < 0.45


def test_camera_follows_the_player_in_a_larger_world_and_shows_a_small_world_whole():
    follow = [read_scene(t.frame) for i in range(3) for t in generate_session(9, i).turns if not t.scene.pages]
    assert follow and all(s.player == demo.CENTRE for s in follow)  # like the real game's centre tile
    fixed = [
        read_scene(t.frame) for i in range(3) for t in generate_session(9, i, world_size=8).turns if not t.scene.pages
    ]
    assert len({s.player for s in fixed}) > 3
    world = open_world((0, 0), "up", (2, 1))  # player in the top-left corner of a 12x12 world
    world.tiles = np.full((12, 12), GRASS, dtype=np.int8)
    view = demo.view_of(world)
    assert view.player == demo.CENTRE and view.goal == (6, 5)
    assert (view.tiles[:4, :] == TREE).all() and (view.tiles[:, :4] == TREE).all()  # outside the world: forest
    assert expert_button(view) == expert_button(world) == "right"  # across the facing (up)
