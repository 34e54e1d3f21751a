"""The play loop: a policy presses buttons in an env (the demo world or the emulator), with per-episode
statistics and optional recording as Eevee v1 runs.

Each step: the policy sees the last 4 frames (oldest first; the first frame repeated at the start),
the context and the info; its button is pressed; the frame it saw and the button are recorded.
An answer not in BUTTONS is counted (`invalid_answers`) and asked again once; a second one ends the
episode with `error` set. Ctrl-C finishes the current step and returns what was played (a second
Ctrl-C stops at once). An env error (e.g. the emulator died) closes the recording, which stays valid
up to the last completed step, and is raised.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import BUTTONS, FRAMES_PER_SAMPLE
from .policies import Policy
from .record import SessionRecorder, session_name

STUCK_RUN = 8  # presses in a row that leave the frame unchanged count as stuck from this length on
INFO_TO_RECORD = (
    "expert_button",
    "expert_reasoning",
    "expert_observations",
    "optimal_steps",
    "goals_done",
    "goal_steps",
    "player",
    "facing",
    "goal",
    "goal_visible",
    "dialogue",
)


@dataclass
class EpisodeStats:
    policy: str
    episode: int
    seed: int | None
    goals_target: int | None = None  # goals that end the episode (None: the env has no goals)
    steps: int = 0
    goals_done: int = 0
    goal_steps: list[int] = field(default_factory=list)  # presses spent on each completed goal
    goal_optimal: list[int] = field(default_factory=list)  # the expert's presses for it, from its start state
    stuck_steps: int = 0
    buttons: dict[str, int] = field(default_factory=dict)
    expert_agreement: float | None = None  # share of presses equal to the expert's (demo world)
    invalid_answers: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    pressed: list[str] = field(default_factory=list)
    expert: list[str] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    interrupted: bool = False
    error: str | None = None
    session_dir: str | None = None
    frames: list[np.ndarray] | None = field(default=None, repr=False)  # kept only when asked (GIFs)

    @property
    def success(self) -> bool:
        return self.goals_target is not None and self.goals_done >= self.goals_target

    @property
    def steps_per_goal(self) -> float | None:
        return sum(self.goal_steps) / len(self.goal_steps) if self.goal_steps else None

    @property
    def steps_ratio(self) -> float | None:
        """Presses / expert presses over the completed goals (1.0 = as fast as the expert)."""
        return sum(self.goal_steps) / sum(self.goal_optimal) if self.goal_optimal else None

    @property
    def stuck_rate(self) -> float:
        return self.stuck_steps / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "frames"}
        out.update(
            success=self.success,
            steps_per_goal=self.steps_per_goal,
            steps_ratio=self.steps_ratio,
            stuck_rate=self.stuck_rate,
        )
        return out


@contextmanager
def _ctrl_c_finishes_step() -> Iterator[threading.Event]:
    """The first SIGINT sets the event (the loop ends after the step); a second raises KeyboardInterrupt."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _ask(policy: Policy, frames: list[np.ndarray], context: str, info: dict, stats: EpisodeStats) -> str | None:
    """The policy's button; an invalid answer is counted and asked once more; None after two."""
    for _ in range(2):
        answer = policy.act(frames, context, info)
        if isinstance(answer, str) and answer in BUTTONS:
            return answer
        stats.invalid_answers += 1
        if len(stats.invalid_examples) < 5:
            stats.invalid_examples.append(repr(answer)[:80])
    stats.error = f"policy {policy.name} answered {stats.invalid_examples[-1]} twice in a row (not one of BUTTONS)"
    return None


def play_episode(
    env,
    policy: Policy,
    *,
    seed: int | None = None,
    episode: int = 0,
    runs_dir: str | Path | None = None,
    keep_frames: bool = False,
) -> EpisodeStats:
    """One episode until terminated/truncated, Ctrl-C, or a second invalid answer; recorded under
    `runs_dir` (an Eevee runs/ folder) when given."""
    policy.reset(seed)
    obs, info = env.reset(seed=seed)
    base = getattr(env, "unwrapped", env)
    stats = EpisodeStats(policy.name, episode, seed, goals_target=getattr(base, "goals_per_episode", None))
    stats.frames = [] if keep_frames else None
    recorder = None
    if runs_dir is not None:
        recorder = SessionRecorder(
            runs_dir,
            session_name(f"{policy.name}_e{episode:03d}"),
            info.get("goal_sentence", ""),
            vision="expert_button" in info,  # the demo world: the demo's fixed vision analysis, like its sessions
            meta={"policy": policy.name, "episode": episode, "seed": seed, "env": type(base).__name__},
        )
    window = deque([obs] * FRAMES_PER_SAMPLE, maxlen=FRAMES_PER_SAMPLE)
    buttons: Counter = Counter()
    unchanged_run, last, status = 0, None, "completed"
    try:
        with _ctrl_c_finishes_step() as stop:
            while True:
                started = time.perf_counter()
                button = _ask(policy, list(window), info.get("context", ""), {**info, "last_button": last}, stats)
                stats.latencies_s.append(time.perf_counter() - started)
                if button is None:
                    status = "error"
                    break
                new_obs, reward, terminated, truncated, new_info = env.step(BUTTONS.index(button))
                stats.steps += 1
                buttons[button] += 1
                stats.pressed.append(button)
                if "expert_button" in info:
                    stats.expert.append(info["expert_button"])
                if stats.frames is not None:
                    stats.frames.append(obs)
                if recorder is not None:
                    play = {
                        "policy": policy.name,
                        "episode": episode,
                        "step": stats.steps,
                        "latency_s": round(stats.latencies_s[-1], 4),
                        **{k: info[k] for k in INFO_TO_RECORD if k in info},
                    }
                    recorder.add_turn(
                        obs,
                        button,
                        reasoning=getattr(policy, "last_reasoning", "") or "",
                        observations=getattr(policy, "last_observations", "") or "",
                        context_detected=info.get("scene_context"),
                        play=play,
                    )
                unchanged_run = unchanged_run + 1 if np.array_equal(new_obs, obs) else 0
                if unchanged_run == STUCK_RUN:  # the run is long enough: all its presses count
                    stats.stuck_steps += STUCK_RUN
                elif unchanged_run > STUCK_RUN:
                    stats.stuck_steps += 1
                if reward > 0:
                    stats.goals_done += 1
                    stats.goal_steps.append(info.get("goal_steps", 0) + 1)
                    if "goal_expert_presses" in info:
                        stats.goal_optimal.append(info["goal_expert_presses"])
                obs, info, last = new_obs, new_info, button
                window.append(obs)
                stats.terminated, stats.truncated = bool(terminated), bool(truncated)
                if terminated or truncated:
                    break
                if stop.is_set():
                    stats.interrupted, status = True, "interrupted"
                    break
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException:
        status = "error"
        raise
    finally:
        stats.buttons = {b: buttons[b] for b in BUTTONS}
        if stats.expert:
            stats.expert_agreement = sum(p == e for p, e in zip(stats.pressed, stats.expert)) / len(stats.expert)
        if recorder is not None:
            done = recorder.close(status)
            stats.session_dir = str(done) if done else None
        if stats.frames is not None:
            stats.frames.append(obs)  # the last frame, after the last press
    return stats


def play(
    env,
    policy: Policy,
    episodes: int,
    *,
    seed: int | None = 0,
    runs_dir: str | Path | None = None,
    keep_frames: int = 0,
    on_episode: Callable[[EpisodeStats], None] | None = None,
) -> list[EpisodeStats]:
    """`episodes` episodes (seeds seed, seed+1, ...); frames kept for the first `keep_frames` (GIFs).
    Stops early, returning what was played, after a Ctrl-C."""
    results = []
    for i in range(episodes):
        stats = play_episode(
            env,
            policy,
            seed=None if seed is None else seed + i,
            episode=i,
            runs_dir=runs_dir,
            keep_frames=i < keep_frames,
        )
        results.append(stats)
        if on_episode is not None:
            on_episode(stats)
        if stats.interrupted:
            break
    return results


__all__ = ["STUCK_RUN", "EpisodeStats", "play", "play_episode"]
