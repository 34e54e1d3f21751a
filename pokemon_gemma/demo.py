"""Procedural demo sessions in the Eevee v1 V3 run format: the embedded default dataset of demo.sh.

The screen is 8x8 tiles of 30x20 px rendered to a 240x160 RGB frame (the real recordings' grid: the
tiny model's processor squashes a frame to 64x64, so one tile is exactly one 8x8 vision patch).
By default each session is a 12x12 world seen through a camera that follows the player, who stays
on screen tile (4, 4) like in the real game; `world_size=8` shows a whole 8x8 world instead.
Grass and paths are walkable, trees and water are not; the goal is a house door or a villager
(NPC), always on screen. An expert policy picks every turn's button from what the frame shows:

* a dialogue box with a red arrow -> `a`; a dialogue box with a YES/NO menu -> `b` (decline);
* next to the goal and facing it -> `a` (opens the goal's dialogue), next to it but facing away ->
  the direction towards it (turns the player);
* otherwise one step along a shortest on-screen path, preferring the axis perpendicular to the
  way the player faces when both axes are shortest (zig-zag: a straight-line expert makes "repeat
  the last button" score ~60%, this keeps it near 30%).

After a goal's dialogue closes, a new goal appears in the same world. The only text a converter
can put in the context is the session goal sentence, drawn independently of the world, so the
button can only be read from the pixels (mainly the last frame; facing = the last move).
Output is byte-identical for the same seed and flags: every session has its own RNG seeded from
(seed, index), so the first k sessions do not depend on how many are generated.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_write_json, staged_dir

GRID = 8
TILE_W, TILE_H = 30, 20
FRAME_W, FRAME_H = GRID * TILE_W, GRID * TILE_H  # 240 x 160, the GBA screen

GRASS, PATH, TREE, WATER, ROOF, WALL, DOOR = range(7)
GROUND = (GRASS, PATH)
CENTRE = (4, 4)  # the player's tile on screen when the camera follows (the real overlay's centre tile)
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
AXIS = {"up": "v", "down": "v", "left": "h", "right": "h"}
DEMO_BUTTONS = ("up", "down", "left", "right", "a", "b")

# The goal sentence is the only free text a converter may put in the context. It is drawn per
# session independently of the world, so it says nothing about any turn's button.
GOAL_SENTENCES = (
    "explore the town and talk to everyone you meet",
    "visit the houses and villagers around here",
    "look around the area and interact with what you find",
    "find the next person or house to visit",
    "walk around town and check every door and villager",
    "keep exploring and interact with the goal",
)
TEMPLATE = ("exploration_strategy", "6.3")
# The same (vision) analysis for every turn: a per-turn scene type would hint at the button.
VISUAL_ANALYSIS = {
    "scene_type": "overworld",
    "recommended_template": TEMPLATE[0],
    "valid_buttons": [
        {"key": "UP", "action": "move_up"},
        {"key": "DOWN", "action": "move_down"},
        {"key": "LEFT", "action": "move_left"},
        {"key": "RIGHT", "action": "move_right"},
        {"key": "A", "action": "interact"},
        {"key": "B", "action": "cancel"},
    ],
}
TURN_DATA_KEYS = (  # asdict(TurnData) of eevee/run_eevee.py, in order
    "turn_number",
    "timestamp",
    "visual_analysis",
    "movement_data",
    "screenshot_path",
    "screenshot_base64",
    "strategic_decision",
    "memory_context",
    "template_selected",
    "template_version",
    "template_selection_reasoning",
    "final_button_presses",
    "action_result",
    "execution_time",
    "fine_tuning_entry",
    "user_task",
    "escalation_level",
    "session_goal",
    "turn_success",
    "include_in_fine_tuning",
    "failure_reason",
)
MANIFEST = "demo_manifest.json"


# --------------------------------------------------------------------------------------------
# World and expert policy


@dataclass
class Scene:
    """Everything a frame shows. `tiles[y, x]`; positions are (x, y) tile coordinates."""

    tiles: np.ndarray
    player: tuple[int, int]
    facing: str
    goal_kind: str = "npc"  # "npc" | "door"
    goal: tuple[int, int] = (-1, -1)
    house: list[tuple[int, int]] = field(default_factory=list)  # tiles of the goal's house
    pages: list[str] = field(default_factory=list)  # open dialogue: "text" | "question" pages left
    goal_dialogue: bool = False  # the open dialogue was started by interacting with the goal
    text_seed: int = 0  # varies the fake text lines of a dialogue box

    @property
    def dialogue(self) -> str | None:
        return self.pages[0] if self.pages else None


def walkable(scene: Scene, x: int, y: int) -> bool:
    height, width = scene.tiles.shape
    return 0 <= x < width and 0 <= y < height and scene.tiles[y, x] in GROUND and (x, y) != scene.goal


def stand_tiles(scene: Scene) -> list[tuple[int, int]]:
    """Tiles from which the goal can be used: below a door, or any side of a villager."""
    gx, gy = scene.goal
    if scene.goal_kind == "door":
        candidates = [(gx, gy + 1)]
    else:
        candidates = [(gx + dx, gy + dy) for dx, dy in DIRECTIONS.values()]
    return [(x, y) for x, y in candidates if walkable(scene, x, y)]


def distance_map(scene: Scene) -> dict[tuple[int, int], int]:
    """Steps from every walkable tile to the nearest stand tile (BFS; unreachable tiles absent)."""
    dist = {s: 0 for s in stand_tiles(scene)}
    queue = deque(dist)
    while queue:
        x, y = queue.popleft()
        for dx, dy in DIRECTIONS.values():
            n = (x + dx, y + dy)
            if n not in dist and walkable(scene, *n):
                dist[n] = dist[(x, y)] + 1
                queue.append(n)
    return dist


def direction_to(src: tuple[int, int], dst: tuple[int, int]) -> str:
    delta = (dst[0] - src[0], dst[1] - src[1])
    return next(name for name, d in DIRECTIONS.items() if d == delta)


def expert_button(scene: Scene) -> str:
    """The expert's button for what the frame of `scene` shows."""
    if scene.dialogue == "text":
        return "a"
    if scene.dialogue == "question":
        return "b"
    dist = distance_map(scene)
    here = dist.get(scene.player)
    if here is None:
        raise ValueError(f"player at {scene.player} cannot reach the goal at {scene.goal}")
    if here == 0:
        toward = direction_to(scene.player, scene.goal)
        return "a" if scene.facing == toward else toward
    px, py = scene.player
    shortest = [name for name, (dx, dy) in DIRECTIONS.items() if dist.get((px + dx, py + dy)) == here - 1]
    perpendicular = [name for name in shortest if AXIS[name] != AXIS[scene.facing]]
    return (perpendicular or shortest)[0]


def apply_button(scene: Scene, button: str, rng: random.Random, question_rate: float) -> None:
    """Advance the world by one button press (the game's response to the expert)."""
    if scene.pages:
        scene.pages.pop(0)
        scene.text_seed = rng.randrange(1 << 16)
        if not scene.pages and scene.goal_dialogue:
            scene.goal_dialogue = False
            remove_goal(scene)
            place_goal(scene, rng)
        return
    if button in DIRECTIONS:
        scene.facing = button
        dx, dy = DIRECTIONS[button]
        x, y = scene.player[0] + dx, scene.player[1] + dy
        if walkable(scene, x, y):
            scene.player = (x, y)
    elif (
        button == "a" and scene.player in stand_tiles(scene) and scene.facing == direction_to(scene.player, scene.goal)
    ):
        pages = 1 if rng.random() < 0.7 else 2  # mostly one page: long runs of `a` help repeat-last
        scene.pages = ["text"] * pages + (["question"] if rng.random() < question_rate else [])
        scene.goal_dialogue = True
        scene.text_seed = rng.randrange(1 << 16)


def make_world(rng: random.Random, paths: int = 0, size: int = GRID) -> Scene:
    """A size x size world: grass, up to `paths` straight paths, scattered trees and ponds (about
    one obstacle per 9 tiles); the player on a well-connected tile."""
    scale = size * size / (GRID * GRID)
    while True:
        tiles = np.full((size, size), GRASS, dtype=np.int8)
        for _ in range(rng.randint(0, paths)):
            if rng.random() < 0.5:
                tiles[rng.randrange(size), :] = PATH
            else:
                tiles[:, rng.randrange(size)] = PATH
        for _ in range(rng.randint(round(3 * scale), round(7 * scale))):
            x, y = rng.randrange(size), rng.randrange(size)
            if tiles[y, x] == GRASS:
                tiles[y, x] = TREE
        for _ in range(rng.randint(0, round(2 * scale))):
            w, h = rng.choice([(2, 1), (1, 2), (2, 2)])
            x, y = rng.randrange(size - w + 1), rng.randrange(size - h + 1)
            block = tiles[y : y + h, x : x + w]
            block[block == GRASS] = WATER
        ground = [(x, y) for y in range(size) for x in range(size) if tiles[y, x] in GROUND]
        scene = Scene(tiles=tiles, player=rng.choice(ground), facing=rng.choice(list(DIRECTIONS)))
        if len(_reachable(scene, scene.player)) >= 30 * scale:
            return scene


def view_of(scene: Scene) -> Scene:
    """What the screen shows: an 8x8 window of the world. A world larger than the screen is seen
    through a camera that follows the player, who stays on tile (4, 4) like in the real game (and
    the real overlay's centre tile); outside the world is forest. An 8x8 world is shown whole."""
    height, width = scene.tiles.shape
    if (height, width) == (GRID, GRID):
        return Scene(
            scene.tiles.copy(),
            scene.player,
            scene.facing,
            scene.goal_kind,
            scene.goal,
            list(scene.house),
            list(scene.pages),
            scene.goal_dialogue,
            scene.text_seed,
        )
    ox, oy = scene.player[0] - CENTRE[0], scene.player[1] - CENTRE[1]
    tiles = np.full((GRID, GRID), TREE, dtype=np.int8)
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + GRID, width), min(oy + GRID, height)
    tiles[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = scene.tiles[y0:y1, x0:x1]
    gx, gy = scene.goal[0] - ox, scene.goal[1] - oy
    goal = (gx, gy) if scene.goal != (-1, -1) and 0 <= gx < GRID and 0 <= gy < GRID else (-1, -1)
    return Scene(
        tiles,
        CENTRE,
        scene.facing,
        scene.goal_kind,
        goal,
        [(x - ox, y - oy) for x, y in scene.house],
        list(scene.pages),
        scene.goal_dialogue,
        scene.text_seed,
    )


def goal_reachable(scene: Scene, min_steps: int = 0) -> bool:
    """The goal is on screen and reachable through on-screen tiles (so the frame shows the way)."""
    view = view_of(scene)
    if view.goal == (-1, -1):
        return False
    steps = distance_map(view).get(view.player)
    return steps is not None and steps >= min_steps


def _reachable(scene: Scene, start: tuple[int, int]) -> set[tuple[int, int]]:
    seen, queue = {start}, deque([start])
    while queue:
        x, y = queue.popleft()
        for dx, dy in DIRECTIONS.values():
            n = (x + dx, y + dy)
            if n not in seen and walkable(scene, *n):
                seen.add(n)
                queue.append(n)
    return seen


def place_goal(scene: Scene, rng: random.Random, min_steps: int = 3) -> None:
    """Put a new door (with its 2x2 house) or villager on screen where the player can reach it."""
    height, width = scene.tiles.shape
    ox, oy = (0, 0) if (height, width) == (GRID, GRID) else (scene.player[0] - CENTRE[0], scene.player[1] - CENTRE[1])
    for _ in range(500):
        kind = rng.choice(["npc", "door"])
        if kind == "npc":
            goal, house = (ox + rng.randrange(GRID), oy + rng.randrange(GRID)), []
        else:
            hx, hy = ox + rng.randrange(GRID - 1), oy + rng.randrange(GRID - 2)
            house = [(hx, hy), (hx + 1, hy), (hx, hy + 1), (hx + 1, hy + 1)]
            goal = (hx + rng.randint(0, 1), hy + 1)
        cells = house or [goal]
        if any(
            not (0 <= x < width and 0 <= y < height) or scene.tiles[y, x] not in GROUND or (x, y) == scene.player
            for x, y in cells
        ):
            continue
        saved = scene.tiles.copy()
        for x, y in house:
            scene.tiles[y, x] = DOOR if (x, y) == goal else ROOF if y == house[0][1] else WALL
        scene.goal_kind, scene.goal, scene.house = kind, goal, house
        if goal_reachable(scene, min_steps):
            return
        scene.tiles, scene.goal, scene.house = saved, (-1, -1), []
    raise RuntimeError("could not place a reachable goal")  # the connectivity check makes this unreachable


def remove_goal(scene: Scene) -> None:
    for x, y in scene.house:
        scene.tiles[y, x] = GRASS
    scene.goal, scene.house = (-1, -1), []


# --------------------------------------------------------------------------------------------
# Rendering: numpy sprites, one per tile kind; large, high-contrast shapes that survive the
# squash to 64x64 (a tile becomes 8x8 pixels).

_C = {
    "grass": (104, 184, 80),
    "path": (226, 206, 152),
    "canopy": (20, 92, 36),
    "water": (48, 104, 224),
    "wave": (150, 196, 250),
    "roof": (176, 48, 40),
    "roof_line": (120, 30, 24),
    "wall": (236, 228, 204),
    "window": (90, 140, 210),
    "door": (88, 48, 16),
    "knob": (255, 220, 0),
    "outline": (0, 0, 0),
    "player": (230, 24, 24),
    "facing": (255, 236, 0),
    "npc": (40, 64, 210),
    "skin": (250, 208, 168),
    "hair": (30, 20, 10),
    "grid": (200, 200, 200),
    "box": (250, 250, 250),
    "ink": (60, 60, 70),
    "arrow": (224, 16, 16),
}


def _tile(color) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (TILE_H, TILE_W, 3)).copy()


def _ellipse_mask(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    ys, xs = np.mgrid[0:TILE_H, 0:TILE_W]
    return ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1.0


def _build_sprites() -> dict:
    s = {}
    # Flat ground and canopy-only trees: texture and detail are clutter the tiny model must learn to
    # ignore (measured: 0.40 -> 0.49 held-out accuracy at the same training budget without them).
    s[GRASS] = _tile(_C["grass"])
    s[PATH] = _tile(_C["path"])
    t = s[GRASS].copy()
    t[_ellipse_mask(15, 10, 13, 9)] = _C["canopy"]
    s[TREE] = t
    t = _tile(_C["water"])
    for y in (5, 13):
        t[y : y + 2, 4:12] = _C["wave"]
        t[y + 2 : y + 4, 17:26] = _C["wave"]
    s[WATER] = t
    t = _tile(_C["roof"])
    t[6:8, :] = t[13:15, :] = _C["roof_line"]
    s[ROOF] = t
    t = _tile(_C["wall"])
    t[4:12, 9:21] = _C["window"]
    s[WALL] = t
    t = _tile(_C["wall"])
    t[1:, 5:25] = _C["outline"]
    t[2:, 7:23] = _C["door"]
    t[10:13, 18:21] = _C["knob"]
    s[DOOR] = t
    # Player: a red body with a black outline and a yellow half on the side it faces.
    body = np.zeros((TILE_H, TILE_W), bool)
    body[1:19, 3:27] = True
    inner = np.zeros_like(body)
    inner[3:17, 5:25] = True
    s["player_body"], s["player_inner"] = body, inner
    half = {d: np.zeros_like(body) for d in DIRECTIONS}
    half["up"][3:9, 5:25] = True
    half["down"][11:17, 5:25] = True
    half["left"][3:17, 5:13] = True
    half["right"][3:17, 17:25] = True
    s["facing"] = half
    # Villager: black hair, skin face, blue body: a figure unlike the player.
    npc = np.zeros((TILE_H, TILE_W, 3), np.uint8)
    npc_mask = np.zeros((TILE_H, TILE_W), bool)
    for (y0, y1, x0, x1), color in (((0, 4, 9, 21), "hair"), ((3, 10, 9, 21), "skin"), ((10, 20, 6, 24), "npc")):
        npc[y0:y1, x0:x1] = _C[color]
        npc_mask[y0:y1, x0:x1] = True
    s["npc"], s["npc_mask"] = npc, npc_mask
    return s


_SPRITES = _build_sprites()


def _tile_view(frame: np.ndarray, x: int, y: int) -> np.ndarray:
    return frame[y * TILE_H : (y + 1) * TILE_H, x * TILE_W : (x + 1) * TILE_W]


def _text_lines(frame: np.ndarray, x0: int, y0: int, width: int, lines: int, seed: int) -> None:
    """Fake text: dark word bars (no font needed, identical on every platform)."""
    rng = random.Random(seed)
    for line in range(lines):
        x, y = x0, y0 + line * 12
        while x < x0 + width - 10:
            w = rng.randint(8, 26)
            frame[y : y + 5, x : min(x + w, x0 + width)] = _C["ink"]
            x += w + 5


def _box(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    frame[y0:y1, x0:x1] = _C["outline"]
    frame[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3] = _C["box"]


def render(scene: Scene, grid_lines: bool = False) -> np.ndarray:
    """The 160x240x3 uint8 frame of a scene; `grid_lines` adds the real recordings' grey 8x8 grid."""
    frame = np.empty((FRAME_H, FRAME_W, 3), np.uint8)
    for y in range(GRID):
        for x in range(GRID):
            _tile_view(frame, x, y)[:] = _SPRITES[int(scene.tiles[y, x])]
    if scene.goal_kind == "npc" and scene.goal != (-1, -1):
        view = _tile_view(frame, *scene.goal)
        view[_SPRITES["npc_mask"]] = _SPRITES["npc"][_SPRITES["npc_mask"]]
    view = _tile_view(frame, *scene.player)
    view[_SPRITES["player_body"]] = _C["outline"]
    view[_SPRITES["player_inner"]] = _C["player"]
    view[_SPRITES["facing"][scene.facing]] = _C["facing"]
    if grid_lines:  # on tile borders, like the real overlay (off by default: clutter for a tiny model)
        frame[::TILE_H, :] = _C["grid"]
        frame[:, ::TILE_W] = _C["grid"]
    if scene.dialogue:
        _box(frame, 0, 6 * TILE_H, FRAME_W, FRAME_H)  # bottom two tile rows
        _text_lines(frame, 12, 6 * TILE_H + 10, 190, 2, scene.text_seed)
        if scene.dialogue == "text":  # red "more" arrow, bottom right
            for i in range(8):
                frame[138 + i, 212 + i : 228 - i] = _C["arrow"]
        else:  # YES/NO menu above the box, cursor on NO
            _box(frame, 6 * TILE_W, 3 * TILE_H, FRAME_W, 6 * TILE_H)
            frame[76:81, 200:225] = _C["ink"]
            frame[96:101, 200:220] = _C["ink"]
            for i, w in enumerate((2, 4, 6, 6, 4, 2)):  # cursor triangle pointing at NO
                frame[95 + i, 190 : 190 + w] = _C["outline"]
    return frame


def png_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Sessions in the Eevee v1 V3 format


@dataclass
class DemoTurn:
    turn: int
    button: str
    frame: np.ndarray
    reasoning: str
    observations: str
    context_detected: str
    scene: Scene  # the on-screen state the frame shows


@dataclass
class DemoSession:
    session_id: str
    goal: str
    start: datetime
    turns: list[DemoTurn]


def _goal_name(scene: Scene) -> str:
    return "door" if scene.goal_kind == "door" else "villager"


def explain(scene: Scene, button: str) -> tuple[str, str, str]:
    """(reasoning, observations, context_detected) an expert would write for this turn."""
    if scene.dialogue == "text":
        return (
            "A dialogue box is open with more text; press A to continue.",
            "Dialogue box at the bottom of the screen with a continue arrow.",
            "dialogue",
        )
    if scene.dialogue == "question":
        return (
            "A yes/no question is open; decline it with B.",
            "Dialogue box with a YES/NO menu; the cursor is on NO.",
            "dialogue",
        )
    name = _goal_name(scene)
    where = f"at tile {scene.goal[0]},{scene.goal[1]}" if scene.goal != (-1, -1) else "not on screen"
    obs = f"Player at tile {scene.player[0]},{scene.player[1]} facing {scene.facing}; {name} {where}."
    if button == "a":
        return f"Standing next to the {name} and facing it; press A to interact.", obs, "navigation"
    if scene.player in stand_tiles(scene):
        return f"Next to the {name} but facing {scene.facing}; turn {button} to face it.", obs, "navigation"
    return f"The shortest path to the {name} continues {button}.", obs, "navigation"


def generate_session(
    seed: int,
    index: int,
    min_turns: int = 8,
    max_turns: int = 16,
    dialogue_rate: float = 0.08,
    question_rate: float = 0.7,
    paths: int = 0,
    grid_lines: bool = False,
    world_size: int = 12,
) -> DemoSession:
    """One session: a world, goals one after another, `min_turns..max_turns` expert turns."""
    if not 4 <= min_turns <= max_turns:
        raise ValueError(f"need 4 <= min_turns <= max_turns, got {min_turns}..{max_turns}")
    rng = random.Random(f"pokemon-gemma-demo:{seed}:{index}")
    n_turns = rng.randint(min_turns, max_turns)
    goal_text = rng.choice(GOAL_SENTENCES)
    # Sessions of one seed never overlap in time; different seeds start on different days.
    base = datetime(2025, 7, 1, 8, 0, 0) + timedelta(days=seed % 3000)
    start = base + timedelta(
        seconds=index * (max_turns * 14 + 120) + rng.randrange(60), microseconds=rng.randrange(1_000_000)
    )
    if world_size < GRID:
        raise ValueError(f"world_size must be >= {GRID}, got {world_size}")
    scene = make_world(rng, paths, world_size)
    place_goal(scene, rng)
    turns = []
    for t in range(1, n_turns + 1):
        # Occasional unrelated messages (signs, tips) interrupt the walk.
        if not scene.pages and rng.random() < dialogue_rate:
            scene.pages = [rng.choice(["text", "question"])]
            scene.text_seed = rng.randrange(1 << 16)
        # The expert decides from the screen alone: its button is a function of the frame.
        view = view_of(scene)
        button = expert_button(view)
        reasoning, observations, context = explain(view, button)
        turns.append(DemoTurn(t, button, render(view, grid_lines), reasoning, observations, context, view))
        apply_button(scene, button, rng, question_rate)
        if not scene.pages and not goal_reachable(scene):
            # Rare: the way to the goal left the screen; the goal moves somewhere visible.
            remove_goal(scene)
            place_goal(scene, rng, min_steps=1)
    return DemoSession(start.strftime("%Y%m%d_%H%M%S"), goal_text, start, turns)


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="microseconds")


def turn_json(
    number: int,
    button: str,
    reasoning: str,
    observations: str,
    context_detected: str | None,
    goal: str,
    now: datetime,
    executed: datetime,
    extra: dict | None = None,
    visual: dict | None = VISUAL_ANALYSIS,
) -> tuple[dict, dict]:
    """(turns[] entry, enhanced_turns[] entry) of one turn whose decision is `button`, in the V3 writer's
    shape; `extra` keys join the decision (real decisions carry extras too), `visual=None` = no vision."""
    parsed = {
        "button_presses": [button],
        "reasoning": reasoning,
        "observations": observations,
        "context_detected": context_detected,
        "confidence": "high",
        **(extra or {}),
    }
    va = None
    if visual is not None:
        va = {"raw_pixtral_response": "```json\n" + json.dumps(visual, indent=2) + "\n```", **visual}
    turn = {
        "turn": number,
        "timestamp": _iso(now),
        "ai_analysis": {
            "parsed_json": parsed,
            "raw_text": "```json\n" + json.dumps(parsed, indent=2) + "\n```",
            "parsing_success": True,
        },
        "button_presses": [button],
        "action_result": True,
        "screenshot_path": f"screenshot_{number}.png",
        "execution_time": _iso(executed),
        "template_used": TEMPLATE[0],
        "template_version": TEMPLATE[1],
        "visual_analysis": va,
        "strategic_context": None,
        "memory_context": None,
    }
    values = {
        "turn_number": number,
        "timestamp": _iso(now),
        "movement_data": None if visual is None else dict(visual),
        "template_selected": TEMPLATE[0],
        "template_version": TEMPLATE[1],
        "final_button_presses": [button],
        "action_result": True,
        "execution_time": _iso(executed),
        "session_goal": goal,
        "turn_success": True,
        "include_in_fine_tuning": True,
    }
    return turn, {k: values.get(k) for k in TURN_DATA_KEYS}


def session_data(
    session_id: str, goal: str, start: datetime, turns: list[dict], enhanced: list[dict], status: str = "running"
) -> dict:
    """The session_data.json object around already built turns (V3 top-level keys, in order)."""
    n = len(turns)
    start_iso = _iso(start)
    return {
        "session_metadata": {
            "session_id": session_id,
            "goal": goal,
            "start_time": start_iso,
            "status": status,
            "total_turns": n,
            "successful_turns": n,
            "fine_tuning_eligible": max(0, n - 3),
        },
        "session_id": session_id,
        "goal": goal,
        "start_time": start_iso,
        "turns": turns,
        "enhanced_turns": enhanced,
    }


def session_json(session: DemoSession) -> tuple[dict, list[dict]]:
    """(session_data.json object, per-turn visual analysis dicts) in the V3 writer's shape."""
    rng = random.Random(f"timestamps:{session.session_id}")
    turns, enhanced, now = [], [], session.start
    for turn in session.turns:
        now = now + timedelta(seconds=10 + rng.uniform(-1.5, 1.5))  # LLM turns are ~10 s apart
        executed = now - timedelta(seconds=rng.uniform(0.2, 1.5))
        entry, values = turn_json(
            turn.turn,
            turn.button,
            turn.reasoning,
            turn.observations,
            turn.context_detected,
            session.goal,
            now,
            executed,
        )
        turns.append(entry)
        enhanced.append(values)
    data = session_data(session.session_id, session.goal, session.start, turns, enhanced)
    return data, [t["visual_analysis"] for t in turns]


def visual_analysis_text(step: int, raw: str) -> str:
    """`step_NNNN_visual_analysis.txt` as written since 22 Jun (the raw response twice)."""
    return (
        f"VISUAL ANALYSIS STEP {step}\n{'=' * 60}\n\nGRID SIZE: 8x8\nRAW PIXTRAL RESPONSE:\n{raw}\n\n"
        f"--- RAW PIXTRAL RESPONSE ---\n{raw}\n--- END RAW RESPONSE ---\n"
    )


def write_session(session: DemoSession, runs_dir: Path) -> Path:
    """Write one session folder; it appears under its final name only when complete (rename)."""
    final = runs_dir / f"session_{session.session_id}"
    data, analyses = session_json(session)
    with staged_dir(final) as tmp:
        (tmp / "sshots").mkdir()
        for turn, va in zip(session.turns, analyses):
            (tmp / "sshots" / f"step_{turn.turn:04d}_grid.png").write_bytes(png_bytes(turn.frame))
            (tmp / f"step_{turn.turn:04d}_visual_analysis.txt").write_text(
                visual_analysis_text(turn.turn, va["raw_pixtral_response"]), encoding="utf-8"
            )
        (tmp / "session_data.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return final


class DemoOutputError(ValueError):
    """The output folder holds runs this generator did not write (message says how to fix)."""


def write_demo_sessions(
    output_dir: str | Path,
    sessions: int,
    seed: int = 0,
    min_turns: int = 8,
    max_turns: int = 16,
    dialogue_rate: float = 0.08,
    question_rate: float = 0.7,
    paths: int = 0,
    grid_lines: bool = False,
    world_size: int = 12,
    overwrite: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Write `sessions` demo sessions to `output_dir/runs/` and a manifest; return the summary.

    An existing `runs/` with sessions is refused unless `overwrite`, and then only the sessions
    listed in this generator's earlier manifest are removed (never anything else).
    """
    output_dir = Path(output_dir)
    runs_dir = output_dir / "runs"
    manifest_path = output_dir / MANIFEST
    existing = sorted(p.name for p in runs_dir.glob("session_*")) if runs_dir.is_dir() else []
    if existing:
        if not overwrite:
            raise DemoOutputError(
                f"{runs_dir} already holds {len(existing)} sessions (pass --overwrite to "
                f"replace an earlier demo output, or choose an empty --output_dir)"
            )
        previous = json.loads(manifest_path.read_text()).get("sessions", []) if manifest_path.is_file() else []
        foreign = sorted(set(existing) - {f"session_{s}" for s in previous})
        if foreign:
            raise DemoOutputError(
                f"{runs_dir} holds sessions this generator did not write (e.g. {foreign[0]}); "
                f"choose another --output_dir"
            )
        for name in existing:
            shutil.rmtree(runs_dir / name)
    runs_dir.mkdir(parents=True, exist_ok=True)
    labels: Counter = Counter()
    ids, n_turns, repeats = [], 0, 0
    for index in (progress or (lambda it: it))(range(sessions)):
        session = generate_session(
            seed, index, min_turns, max_turns, dialogue_rate, question_rate, paths, grid_lines, world_size
        )
        write_session(session, runs_dir)
        ids.append(session.session_id)
        buttons = [t.button for t in session.turns]
        labels.update(buttons)
        n_turns += len(buttons)
        repeats += sum(a == b for a, b in zip(buttons, buttons[1:]))
    summary = {
        "generator": "pokemon_gemma.demo",
        "format": "eevee-v1 V3",
        "params": {
            "sessions": sessions,
            "seed": seed,
            "min_turns": min_turns,
            "max_turns": max_turns,
            "dialogue_rate": dialogue_rate,
            "question_rate": question_rate,
            "paths": paths,
            "grid_lines": grid_lines,
            "world_size": world_size,
        },
        "turns": n_turns,
        "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
        "majority_share": round(max(labels.values()) / n_turns, 4) if n_turns else 0.0,
        "repeat_last_share": round(repeats / max(1, n_turns - sessions), 4),
        "sessions": ids,
    }
    atomic_write_json(manifest_path, summary)
    return summary


__all__ = [
    "GRID",
    "TILE_W",
    "TILE_H",
    "FRAME_W",
    "FRAME_H",
    "CENTRE",
    "GOAL_SENTENCES",
    "Scene",
    "DemoSession",
    "view_of",
    "DemoOutputError",
    "expert_button",
    "apply_button",
    "render",
    "make_world",
    "place_goal",
    "generate_session",
    "session_json",
    "turn_json",
    "session_data",
    "write_session",
    "write_demo_sessions",
]
