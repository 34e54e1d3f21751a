"""Play evaluation as a stage: several policies side by side on the same seeded episodes of the demo
world (or playing the real emulator), with the report, GIFs and recordings. Used by scripts/play.py,
the production pipeline's play gate and DAgger."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import first_line
from ..fileio import now_iso
from ..progress import progress
from .loop import EpisodeStats, play_episode
from .policies import Policy, PolicyError, make_policy
from .report import write_report

ENVS = ("demo", "skyemu")


@dataclass
class PlayConfig:
    env: str = "demo"
    policies: tuple[str, ...] = ("model", "random", "repeat_last")
    episodes: int = 50
    max_steps: int = 120
    goals_per_episode: int = 3
    seed: int = 0
    output_dir: str = "play"
    record_dir: str | None = None  # an Eevee runs/ folder per policy under it
    gif: int = 2  # GIFs of the first K episodes per policy
    model_path: str | None = None
    adapter_path: str | None = None
    server_url: str | None = None
    api_key: str | None = None
    skyemu_url: str = "http://127.0.0.1:8080"
    goal: str = ""  # the emulator's goal sentence (the demo world draws its own)
    state_path: str | None = None  # a SkyEmu save state loaded at each reset
    train_dataset_path: str | None = None  # for the majority policy
    precision: str = "no"
    frame_layout: str | None = None
    default_frame_layout: str = "images"
    world_size: int = 12
    dialogue_rate: float = 0.0
    question_rate: float = 0.7
    unstick: bool = True  # model/server policies: a button already pressed on a screen is not pressed there again
    token: str | None = field(default=None, repr=False)


class PlayError(RuntimeError):
    """Play cannot start or stopped (one line naming the URL/file); `code` 2 = usage, 1 = failure."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def make_env(cfg: PlayConfig):
    if cfg.env == "demo":
        from .env import DemoWorldEnv

        return DemoWorldEnv(
            goals_per_episode=cfg.goals_per_episode,
            max_steps=cfg.max_steps,
            world_size=cfg.world_size,
            dialogue_rate=cfg.dialogue_rate,
            question_rate=cfg.question_rate,
        )
    if cfg.env == "skyemu":
        from .skyemu import SkyEmuEnv, SkyEmuError

        try:
            return SkyEmuEnv(cfg.skyemu_url, goal=cfg.goal, max_steps=cfg.max_steps, state_path=cfg.state_path)
        except SkyEmuError as exc:
            raise PlayError(str(exc)) from None
    raise PlayError(f"--env must be one of {', '.join(ENVS)}, got {cfg.env!r}", code=2)


def build_policy(name: str, cfg: PlayConfig) -> Policy:
    """One policy by name, with what it needs from the config (checked before anything is played)."""
    if name == "expert" and cfg.env != "demo":
        raise PlayError("the expert policy exists in the demo world only (--env demo)", code=2)
    if name == "model":
        if not cfg.model_path:
            raise PlayError("the model policy needs --model_path (a run, adapter, merged or MLX folder)", code=2)
        return make_policy(
            "model",
            model_path=cfg.model_path,
            adapter_path=cfg.adapter_path,
            frame_layout=cfg.frame_layout,
            default_frame_layout=cfg.default_frame_layout,
            precision=cfg.precision,
            token=cfg.token,
            unstick=cfg.unstick,
        )
    if name == "server":
        if not cfg.server_url:
            raise PlayError("the server policy needs --server_url (our inference server)", code=2)
        return make_policy("server", server_url=cfg.server_url, api_key=cfg.api_key, unstick=cfg.unstick)
    if name == "majority":
        if not cfg.train_dataset_path:
            raise PlayError("the majority policy needs --train_dataset_path (the converter's train.jsonl)", code=2)
        return make_policy("majority", path=cfg.train_dataset_path)
    if name == "random":
        return make_policy("random", seed=cfg.seed)
    return make_policy(name)


def run_play(
    cfg: PlayConfig,
    *,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
    policies: dict[str, Policy] | None = None,
) -> dict[str, Any]:
    """Play every policy on the same seeded episodes; write play_report.{json,md,png} and GIFs into
    cfg.output_dir and return the report. A policy or emulator failure writes the report for what was
    played, then raises PlayError; so does Ctrl-C (after finishing the current step)."""
    if cfg.episodes < 1 or cfg.max_steps < 1 or cfg.goals_per_episode < 1:
        raise PlayError("--episodes, --max_steps and --goals_per_episode must be at least 1", code=2)
    try:
        policies = policies or {name: build_policy(name, cfg) for name in cfg.policies}
    except PolicyError as exc:
        raise PlayError(str(exc)) from None
    env = make_env(cfg)
    results: dict[str, list[EpisodeStats]] = {name: [] for name in policies}
    failure: str | None = None
    interrupted = False
    bar = progress(total=len(policies) * cfg.episodes, desc="play", unit="episode", disable=not show_progress)
    try:
        for name, policy in policies.items():
            policy.name = name
            runs_dir = Path(cfg.record_dir) / name / "runs" if cfg.record_dir else None
            for episode in range(cfg.episodes):
                stats = play_episode(
                    env,
                    policy,
                    seed=cfg.seed + episode,
                    episode=episode,
                    runs_dir=runs_dir,
                    keep_frames=episode < cfg.gif,
                )
                results[name].append(stats)
                done = results[name]
                bar.update(1)
                bar.set_postfix(policy=name, goals=sum(e.goals_done for e in done), refresh=False)
                if stats.error:
                    raise PolicyError(stats.error)
                if stats.interrupted:
                    interrupted = True
                    break
            if interrupted:
                break
    except Exception as exc:  # noqa: BLE001 - any failure: report what was played, then say why in one line
        from .skyemu import SkyEmuError

        if not isinstance(exc, PolicyError | SkyEmuError | OSError):
            raise
        failure = first_line(exc)
    finally:
        bar.close()
        meta = {
            "env": cfg.env,
            "episodes": cfg.episodes,
            "max_steps": cfg.max_steps,
            "seed": cfg.seed,
            "goals_per_episode": cfg.goals_per_episode if cfg.env == "demo" else None,
            "model_path": cfg.model_path,
            "server_url": cfg.server_url,
            "skyemu_url": cfg.skyemu_url if cfg.env == "skyemu" else None,
            "record_dir": cfg.record_dir,
            "created_at": now_iso(),
            "interrupted": interrupted,
            "error": failure,
        }
        report = write_report({k: v for k, v in results.items() if v}, cfg.output_dir, gif_episodes=cfg.gif, meta=meta)
    if failure:
        raise PlayError(f"{failure} (report of what was played: {Path(cfg.output_dir) / 'play_report.md'})")
    if interrupted:
        echo("interrupted: the report covers the episodes played so far")
    return report


def success_table(report: dict[str, Any]) -> str:
    """One line per policy: success rate, steps ratio, stuck rate, latency."""

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [
        f"{'policy':<14} {'success':>8} {'episodes':>9} {'steps/goal':>10} {'ratio':>6} {'stuck':>6} {'p50 ms':>8}"
    ]
    for name, s in report["policies"].items():
        lines.append(
            f"{name:<14} {fmt(s['success_rate']):>8} {fmt(s['episode_success_rate']):>9} "
            f"{fmt(s['steps_per_goal'], '.1f'):>10} {fmt(s['steps_ratio'], '.2f'):>6} "
            f"{fmt(s['stuck_rate'], '.3f'):>6} {fmt(s['latency_ms_p50'], '.1f'):>8}"
        )
    return "\n".join(lines)
