"""The demo world (pokemon_gemma.demo) as a Gymnasium environment: `pokemon_gemma/DemoWorld-v0`.

Observation: the 160x240x3 uint8 frame exactly as the demo recordings show it (`render(view_of(world))`:
a camera that follows the player). Action: Discrete(8), an index into `BUTTONS` = (up, down, left,
right, a, b, start, select); the game's response is demo.apply_button, so start/select do nothing
outside a dialogue and any button turns a dialogue page. Reward: +1 on the press that closes a goal's
dialogue (the goal is done), else 0. A new goal then appears on screen (demo.apply_button places it,
as the demo generator does). Unlike the generator, a goal never moves: a player who wanders off can
lose it off screen and must find it again. `terminated` after `goals_per_episode` goals, `truncated`
at `max_steps` presses.

Randomness: each goal has its own RNG for its dialogue (pages, YES/NO question) and for placing the
next goal, so a goal's cost does not depend on the path taken to it; unrelated message boxes
(`dialogue_rate`, 0.08 in the demo generator) are off by default for the same reason. `reset(seed=s)`
gives byte-identical episodes.

`info` (after reset and every step): expert_button (the demo expert's button for this state: the
training labels' expert when the way to the goal is on screen, else one that knows where the goal
is), optimal_steps (BFS moves from the player to the goal's nearest stand tile), goal_expert_presses
(presses the expert needs from this goal's start state: what steps_ratio is measured against),
goal_steps (presses since this goal started), goals_done, step, player, facing, goal, goal_kind,
goal_visible, dialogue, scene_context, goal_sentence, context (the text training put beside the frames).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..convert import build_context
from ..dataset import BUTTONS, FRAMES_PER_SAMPLE
from ..demo import (
    FRAME_H,
    FRAME_W,
    GOAL_SENTENCES,
    GRID,
    Scene,
    apply_button,
    distance_map,
    expert_button,
    explain,
    make_world,
    place_goal,
    render,
    view_of,
)

ENV_ID = "pokemon_gemma/DemoWorld-v0"
MAX_EXPERT_PRESSES = 1000  # a goal the expert cannot finish in this many presses is a bug, not a slow goal


def goal_context(goal_sentence: str) -> str:
    """The model-visible context the converter writes for a session with this goal (what training saw)."""
    return build_context(goal_sentence, [None] * (FRAMES_PER_SAMPLE - 1))


@dataclass
class WorldState:
    """Everything that changes during an episode; deep-copied to simulate the expert."""

    scene: Scene
    goal_rng: random.Random  # the current goal's dialogue and the placing of the next goal
    noise_rng: random.Random  # unrelated message boxes
    goals_done: int = 0
    goal_steps: int = 0


def demo_expert(scene: Scene) -> str:
    """The expert's button: the recordings' expert (a function of the frame) while the way to the goal
    is on screen, else the same rule on the whole world (it remembers where the goal is)."""
    try:
        return expert_button(view_of(scene))
    except ValueError:  # raised when the way to the goal is not on screen (cheaper than asking goal_reachable first)
        return expert_button(scene)


class DemoWorldEnv(gym.Env):
    """The demo world; see the module docstring for spaces, reward, episode end and info keys."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        render_mode: str | None = None,
        goals_per_episode: int = 3,
        max_steps: int = 120,
        world_size: int = 12,
        paths: int = 0,
        question_rate: float = 0.7,
        dialogue_rate: float = 0.0,
        grid_lines: bool = False,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if goals_per_episode < 1 or max_steps < 1 or world_size < GRID:
            raise ValueError(f"need goals_per_episode >= 1, max_steps >= 1, world_size >= {GRID}")
        self.render_mode = render_mode
        self.goals_per_episode, self.max_steps = goals_per_episode, max_steps
        self.world_size, self.paths, self.grid_lines = world_size, paths, grid_lines
        self.question_rate, self.dialogue_rate = question_rate, dialogue_rate
        self.observation_space = spaces.Box(0, 255, (FRAME_H, FRAME_W, 3), np.uint8)
        self.action_space = spaces.Discrete(len(BUTTONS))
        self.state: WorldState | None = None
        self.goal_sentence = ""
        self._episode_seed = 0
        self._step = 0
        self._goal_expert_presses = 0
        self._distances: tuple = (None, {})

    # -------------------------------------------------------------------- Gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._episode_seed = int(self.np_random.integers(0, 2**62))
        world_rng = random.Random(f"pokemon_gemma.play:{self._episode_seed}:world")
        scene = make_world(world_rng, self.paths, self.world_size)
        place_goal(scene, world_rng)
        self.goal_sentence = world_rng.choice(GOAL_SENTENCES)
        noise = random.Random(f"pokemon_gemma.play:{self._episode_seed}:noise")
        self.state = WorldState(scene, self._goal_rng(0), noise)
        self._step = 0
        self._goal_expert_presses = expert_presses(self.state, self.dialogue_rate, self.question_rate)
        return self._observation(), self._info()

    def step(self, action):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        button = BUTTONS[int(action)]
        done = advance(self.state, button, self.dialogue_rate, self.question_rate)
        self._step += 1
        if done:
            self.state.goal_rng = self._goal_rng(self.state.goals_done)
            self._goal_expert_presses = expert_presses(self.state, self.dialogue_rate, self.question_rate)
        terminated = self.state.goals_done >= self.goals_per_episode
        truncated = not terminated and self._step >= self.max_steps
        return self._observation(), float(done), terminated, truncated, self._info()

    def render(self):
        return self._observation() if self.render_mode == "rgb_array" else None

    # -------------------------------------------------------------------- helpers

    def expert_presses(self) -> int:
        """Presses the expert needs to finish the current goal from the current state (simulated on a copy)."""
        return expert_presses(self.state, self.dialogue_rate, self.question_rate)

    def _goal_rng(self, index: int) -> random.Random:
        return random.Random(f"pokemon_gemma.play:{self._episode_seed}:goal:{index}")

    def _world_distances(self) -> dict:
        """distance_map of the whole world, kept while the goal and the tiles stay the same."""
        scene = self.state.scene
        key = (scene.goal, scene.goal_kind, scene.tiles.tobytes())
        if self._distances[0] != key:
            self._distances = (key, distance_map(scene))
        return self._distances[1]

    def _observation(self) -> np.ndarray:
        return render(view_of(self.state.scene), self.grid_lines)

    def _info(self) -> dict:
        scene = self.state.scene
        view = view_of(scene)
        button = demo_expert(scene)
        reasoning, observations, _ = explain(view, button)
        return {
            "expert_button": button,
            "expert_reasoning": reasoning,  # what the recordings' expert writes with that button
            "expert_observations": observations,
            "optimal_steps": self._world_distances().get(scene.player),
            "goal_expert_presses": self._goal_expert_presses,
            "goal_steps": self.state.goal_steps,
            "goals_done": self.state.goals_done,
            "step": self._step,
            "player": tuple(scene.player),
            "facing": scene.facing,
            "goal": tuple(scene.goal),
            "goal_kind": scene.goal_kind,
            "goal_visible": view.goal != (-1, -1),
            "dialogue": scene.dialogue,
            "scene_context": "dialogue" if scene.pages else "navigation",
            "goal_sentence": self.goal_sentence,
            "context": goal_context(self.goal_sentence),
        }


def advance(state: WorldState, button: str, dialogue_rate: float, question_rate: float) -> bool:
    """One press: the game's response (demo.apply_button), then maybe an unrelated message box.
    Returns True when the press finished the goal."""
    scene = state.scene
    interruption = bool(scene.pages) and not scene.goal_dialogue
    was_goal_dialogue = scene.goal_dialogue
    apply_button(scene, button, state.noise_rng if interruption else state.goal_rng, question_rate)
    done = was_goal_dialogue and not scene.goal_dialogue
    state.goal_steps += 1
    if done:
        state.goals_done += 1
        state.goal_steps = 0
    if dialogue_rate > 0 and not scene.pages and state.noise_rng.random() < dialogue_rate:
        scene.pages = [state.noise_rng.choice(["text", "question"])]
        scene.text_seed = state.noise_rng.randrange(1 << 16)
    return done


def expert_presses(state: WorldState, dialogue_rate: float = 0.0, question_rate: float = 0.7) -> int:
    """Presses the expert needs to finish the current goal from `state`: path + turn + `a` + dialogue
    pages (+ any message boxes on the way), found by playing the expert on a copy of the state."""
    sim = copy.deepcopy(state)
    for presses in range(1, MAX_EXPERT_PRESSES + 1):
        if advance(sim, demo_expert(sim.scene), dialogue_rate, question_rate):
            return presses
    raise RuntimeError(f"the expert did not finish a goal in {MAX_EXPERT_PRESSES} presses (a bug in the demo world)")


__all__ = ["ENV_ID", "DemoWorldEnv", "WorldState", "advance", "demo_expert", "expert_presses", "goal_context"]
