"""Play reports: per-policy figures from played episodes, written as play_report.json (machines),
play_report.md and play_report.png (people), and GIFs of the first episodes with each pressed button
under its frame.

Definitions (over all episodes of a policy): success_rate = goals done / (episodes x goals per
episode); episode_success_rate = share of episodes with every goal done; steps_per_goal and
steps_ratio = presses / the expert's presses, both over completed goals only; stuck_rate = share of
presses inside a run of >= 8 presses that left the frame unchanged; expert_agreement = share of
presses equal to the expert's button (demo world); latency = policy.act time per press.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..dataset import BUTTONS
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..plots import plt, save_png
from .loop import EpisodeStats

CAPTION_H = 18


def summarize(episodes: list[EpisodeStats]) -> dict[str, Any]:
    """The aggregate figures of one policy's episodes (see the module docstring)."""
    n = len(episodes)
    target = episodes[0].goals_target if episodes else None
    goal_steps = sum(sum(e.goal_steps) for e in episodes)
    goal_optimal = sum(sum(e.goal_optimal) for e in episodes)
    goals = sum(e.goals_done for e in episodes)
    steps = sum(e.steps for e in episodes)
    buttons = {b: sum(e.buttons.get(b, 0) for e in episodes) for b in BUTTONS}
    latencies = np.array([t for e in episodes for t in e.latencies_s]) * 1000
    expert = [(p, x) for e in episodes for p, x in zip(e.pressed, e.expert)]
    return {
        "policy": episodes[0].policy if episodes else None,
        "episodes": n,
        "goals_per_episode": target,
        "goals_done": goals,
        "success_rate": goals / (n * target) if n and target else None,
        "episode_success_rate": sum(e.success for e in episodes) / n if n and target else None,
        "steps": steps,
        "steps_per_goal": goal_steps / goals if goals else None,
        "steps_ratio": goal_steps / goal_optimal if goal_optimal else None,
        "stuck_rate": sum(e.stuck_steps for e in episodes) / steps if steps else 0.0,
        "expert_agreement": sum(p == x for p, x in expert) / len(expert) if expert else None,
        "buttons": buttons,
        "invalid_answers": sum(e.invalid_answers for e in episodes),
        "errors": sum(e.error is not None for e in episodes),
        "interrupted": any(e.interrupted for e in episodes),
        "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies.size else None,
        "latency_ms_p95": float(np.percentile(latencies, 95)) if latencies.size else None,
    }


def gif_bytes(
    frames: list[np.ndarray], pressed: list[str], expert: list[str] | None = None, duration_ms: int = 300
) -> bytes:
    """An animated GIF: each frame with the button pressed on it written underneath (and the expert's
    when it differs); the last frame (after the last press) says `end`."""
    images = []
    for i, frame in enumerate(frames):
        h, w = frame.shape[:2]
        canvas = Image.new("RGB", (w, h + CAPTION_H), (0, 0, 0))
        canvas.paste(Image.fromarray(frame, "RGB"), (0, 0))
        if i < len(pressed):
            text = f"{i + 1}: {pressed[i]}"
            if expert and i < len(expert) and expert[i] != pressed[i]:
                text += f"  (expert {expert[i]})"
        else:
            text = "end"
        ImageDraw.Draw(canvas).text((4, h + 3), text, fill=(255, 255, 255))
        images.append(canvas)
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if pct else f"{value:.2f}"
    return str(value)


def report_markdown(summaries: dict[str, dict], meta: dict[str, Any]) -> str:
    lines = ["# Play report", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    header = (
        "| policy | episodes | success | episode success | steps/goal | steps ratio | stuck | expert agreement "
        "| invalid | errors | latency p50 / p95 ms |"
    )
    lines += [header, "|---" * 11 + "|"]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['episodes']} | {_fmt(s['success_rate'], True)} | "
            f"{_fmt(s['episode_success_rate'], True)} | {_fmt(s['steps_per_goal'])} | "
            f"{_fmt(s['steps_ratio'])} | {_fmt(s['stuck_rate'], True)} | "
            f"{_fmt(s['expert_agreement'], True)} | {s['invalid_answers']} | {s['errors']} | "
            f"{_fmt(s['latency_ms_p50'])} / {_fmt(s['latency_ms_p95'])} |"
        )
    lines += ["", "Buttons pressed:", "", "| policy | " + " | ".join(BUTTONS) + " |", "|---" * (len(BUTTONS) + 1) + "|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(str(s["buttons"][b]) for b in BUTTONS) + " |")
    lines += [
        "",
        (
            "success = goals done / (episodes x goals per episode); steps ratio = presses / the expert's "
            "presses on completed goals; stuck = presses in runs of >= 8 that left the frame unchanged."
        ),
        "",
    ]
    return "\n".join(lines)


def report_png(summaries: dict[str, dict], path: str | Path) -> Path:
    names = list(summaries)
    x = np.arange(len(names))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("success_rate", "success rate (goals)", axes[0, 0]),
        ("steps_ratio", "steps ratio (1 = expert)", axes[0, 1]),
        ("stuck_rate", "stuck rate", axes[1, 0]),
    ]
    for key, title, ax in panels:
        values = [summaries[n][key] for n in names]
        ax.bar(x, [v or 0.0 for v in values], color="tab:blue")
        for i, v in enumerate(values):  # n/a: no goal completed, so no steps ratio
            ax.text(i, v or 0.0, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(title)
    ax = axes[1, 1]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        counts = np.array([summaries[name]["buttons"][b] for b in BUTTONS], float)
        ax.bar(np.arange(len(BUTTONS)) + i * width, counts / max(1.0, counts.sum()), width, label=name)
    ax.set_xticks(np.arange(len(BUTTONS)) + 0.4 - width / 2, BUTTONS, rotation=20)
    ax.set_title("buttons pressed (share)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def write_report(
    results: dict[str, list[EpisodeStats]],
    out_dir: str | Path,
    *,
    gif_episodes: int = 2,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """play_report.{json,md,png} and gifs/<policy>_e<NNN>.gif (episodes that kept their frames, the first
    `gif_episodes` per policy) under `out_dir`; returns the JSON object."""
    out = Path(out_dir)
    meta = dict(meta or {})
    summaries = {name: summarize(episodes) for name, episodes in results.items()}
    gifs = []
    for name, episodes in results.items():
        for e in [e for e in episodes if e.frames][:gif_episodes]:
            gif = out / "gifs" / f"{name}_e{e.episode:03d}.gif"
            atomic_write_bytes(gif, gif_bytes(e.frames, e.pressed, e.expert))
            gifs.append(str(gif.relative_to(out)))
    report = {
        "meta": meta,
        "policies": summaries,
        "gifs": gifs,
        "episodes": {name: [e.to_dict() for e in episodes] for name, episodes in results.items()},
    }
    atomic_write_json(out / "play_report.json", report)
    atomic_write_text(out / "play_report.md", report_markdown(summaries, meta))
    report_png(summaries, out / "play_report.png")
    return report


__all__ = ["gif_bytes", "report_markdown", "report_png", "summarize", "write_report"]
