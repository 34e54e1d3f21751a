"""DAgger rounds: the model plays, a labeler says what it should have pressed in every state it visited,
those windows join the training data, training continues from the current adapter; repeat.

Behaviour cloning (BC) on an expert's recordings never shows the model the states its own mistakes
lead to. DAgger collects exactly those states. Each round, per chain, in `OUTPUT_DIR/round_N/<chain>/`:

1. collect  - `dagger`: the current model plays `episodes_per_round` demo-world episodes (recorded as
              Eevee v1 runs), every recorded turn is relabelled by the labeler (the window ending at
              that turn gets the labeler's button; a failed or invalid answer leaves the turn without a
              label, so the converter skips and counts it) and converted into windows.
              `bc`: the expert plays its own episodes until it has produced as many windows as the
              DAgger chain collected this round (the equal-budget comparison).
2. aggregate - the chain's new windows of every round so far, plus a sample of the original training
              windows so that they make `mix` of the set (the same size for both chains).
3. train    - the existing training CLI continues the chain's adapter (`--init_adapter`) for the same
              number of optimizer steps in both chains (resumable from its checkpoints).
4. evaluate - closed loop (play on fixed held-out seeds, never played for data) and offline
              (evaluate.py on the test split).

Play seeds are `play_seed + 1000 * round + k` (BC: `+ 500`), evaluation seeds `eval_seed + k`: disjoint.
Every step leaves a `.done.json` marker: a killed run restarts at the first unfinished step, finished
rounds are skipped. `dagger_report.json`/`.md` and `dagger_report.png` (success rate and steps ratio per
round, both chains) are rewritten after every round.

Labelers (`--labeler`): `expert` (the demo world's expert button recorded for every visited state),
`command:CMD` (runs CMD once per window with a JSON request on stdin, reads a button from stdout) and
`url:URL` (POSTs the same JSON). The request: {"frames": [4 frame paths, oldest first], "goal": ...,
"turn": ..., "session_id": ...}; the answer: a button, bare or as {"button": ...}.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import ArtifactError, adapter_base_model, find_run_config
from .dataset import BUTTONS, FRAMES_PER_SAMPLE
from .eevee import SESSION_DATA
from .fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text, now_iso

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAINS = ("dagger", "bc")
DONE = ".done.json"
# Training settings a continued round takes over from the round-0 run (unless given explicitly).
INHERITED = (
    "batch_size",
    "grad_accum",
    "learning_rate",
    "warmup_ratio",
    "lr_scheduler",
    "max_seq_length",
    "frame_layout",
    "mixed_precision",
    "dataloader_workers",
    "max_grad_norm",
    "weight_decay",
)


class DaggerError(RuntimeError):
    """DAgger cannot go on; one line for people (`code` 2 = usage, 1 = failure)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- labelers
class Labeler:
    """`label(request, turn) -> button | None`; why a label is missing goes to `self.failures`.
    `explanation` is the (reasoning, scene description) that goes with the last label: the training
    answer carries them, so a relabelled window must not keep the player's own text."""

    name = "labeler"

    def __init__(self):
        self.failures: Counter = Counter()
        self.explanation: tuple[str, str] = ("", "")

    def label(self, request: dict[str, Any], turn: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def _button(self, answer: Any) -> str | None:
        """A button from a bare string or {"button": ..., "reasoning"?, "scene_description"?}; anything
        else is an invalid answer."""
        self.explanation = ("", "")
        if isinstance(answer, str):
            text = answer.strip()
            try:
                answer = json.loads(text)
            except ValueError:
                answer = text
        if isinstance(answer, dict):
            self.explanation = (str(answer.get("reasoning") or ""), str(answer.get("scene_description") or ""))
            answer = answer.get("button")
        if isinstance(answer, str) and answer.strip().lower() in BUTTONS:
            return answer.strip().lower()
        self.failures["invalid_button"] += 1
        return None


class ExpertLabeler(Labeler):
    """The demo world's expert button for the state the turn's frame shows (recorded while playing)."""

    name = "expert"

    def label(self, request, turn):
        info = _play_info(turn)
        button = info.get("expert_button")
        if button not in BUTTONS:
            self.failures["no_expert_button"] += 1
            return None
        self.explanation = (info.get("expert_reasoning") or "", info.get("expert_observations") or "")
        return button


class CommandLabeler(Labeler):
    """Runs a program per window: the JSON request on stdin, a button on stdout."""

    def __init__(self, command: str, timeout_s: float = 60.0):
        super().__init__()
        self.argv, self.timeout_s, self.name = shlex.split(command), timeout_s, f"command:{command}"
        if not self.argv:
            raise DaggerError("--labeler command: needs a program (e.g. command:'python my_labeler.py')", code=2)

    def label(self, request, turn):
        try:
            proc = subprocess.run(
                self.argv, input=json.dumps(request), capture_output=True, text=True, timeout=self.timeout_s
            )
        except (OSError, subprocess.TimeoutExpired):
            self.failures["labeler_failed"] += 1
            return None
        if proc.returncode != 0:
            self.failures["labeler_failed"] += 1
            return None
        return self._button(proc.stdout)


class UrlLabeler(Labeler):
    """POSTs the JSON request to a URL; the answer body is a button (bare or {"button": ...})."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        import httpx

        super().__init__()
        self.url, self.name = url, f"url:{url}"
        self.client = httpx.Client(timeout=timeout_s)

    def label(self, request, turn):
        import httpx

        try:
            response = self.client.post(self.url, json=request)
        except httpx.HTTPError:
            self.failures["labeler_failed"] += 1
            return None
        if response.status_code != 200:
            self.failures["labeler_failed"] += 1
            return None
        return self._button(response.text)


def make_labeler(spec: str) -> Labeler:
    if spec == "expert":
        return ExpertLabeler()
    kind, _, value = spec.partition(":")
    if kind == "command" and value:
        return CommandLabeler(value)
    if kind == "url" and value.startswith(("http://", "https://")):
        return UrlLabeler(value)
    raise DaggerError(f"--labeler {spec!r}: use expert, command:CMD or url:http://...", code=2)


def _play_info(turn: dict[str, Any]) -> dict[str, Any]:
    return ((turn.get("ai_analysis") or {}).get("parsed_json") or {}).get("play") or {}


@dataclass
class Relabelled:
    folder: Path
    labelled: int  # turns that got a button from the labeler
    unlabelled: int  # turns the labeler failed on (no label: the converter skips their windows)
    changed: int  # labelled turns whose button differs from the pressed one


def relabel_session(session_dir: Path, runs_out: Path, labeler: Labeler) -> Relabelled:
    """A copy of a recorded session under `runs_out` whose turn decisions are the labeler's buttons
    (the pressed one kept as `play.pressed`)."""
    data = json.loads((session_dir / SESSION_DATA).read_text())
    out = runs_out / session_dir.name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(session_dir, out, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(SESSION_DATA))
    goal = data.get("goal") or data.get("session_metadata", {}).get("goal", "")
    turns = data["turns"]
    frames = [str((out / "sshots" / f"step_{t['turn']:04d}_grid.png").resolve()) for t in turns]
    result = Relabelled(out, 0, 0, 0)
    for i, turn in enumerate(turns):
        window = [frames[max(0, j)] for j in range(i - FRAMES_PER_SAMPLE + 1, i + 1)]
        request = {"frames": window, "goal": goal, "turn": turn["turn"], "session_id": data.get("session_id")}
        button = labeler.label(request, turn)
        parsed = turn["ai_analysis"]["parsed_json"]
        pressed = (parsed.get("button_presses") or [None])[0]
        parsed.setdefault("play", {})["pressed"] = pressed
        parsed["play"]["labeler"] = labeler.name
        parsed["button_presses"] = [button] if button else []
        # The answer trained on is the labeler's: its button with its reasoning (never the player's).
        parsed["reasoning"], parsed["observations"] = labeler.explanation if button else ("", "")
        turn["button_presses"] = parsed["button_presses"]
        turn["ai_analysis"]["raw_text"] = "```json\n" + json.dumps(parsed, indent=2) + "\n```"
        result.labelled += button is not None
        result.unlabelled += button is None
        result.changed += button is not None and button != pressed
    atomic_write_json(out / SESSION_DATA, data)
    return result


def _link_or_copy(src: str, dst: str) -> str:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# --------------------------------------------------------------------------- configuration
@dataclass
class DaggerConfig:
    model_path: str  # round 0: a trained run / adapter folder
    dataset_dir: str  # the converted data it was trained on: train.jsonl, val.jsonl, test.jsonl
    output_dir: str
    rounds: int = 3
    episodes_per_round: int = 30
    max_steps: int = 120
    goals_per_episode: int = 3
    epochs_per_round: float = 1.0
    eval_episodes: int = 50
    eval_seed: int = 100_000
    play_seed: int = 0
    labeler: str = "expert"
    mix: float = 0.5  # share of original training windows in each round's training set
    compare_bc: bool = True
    unstick: bool = False  # play (data and evaluation) with the unstick rule; the other setting is evaluated too
    max_eval_samples: int = 0  # offline evaluation: first N test samples (0 = all)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"learning_rate": 1e-3}
    python: str = sys.executable

    def check(self) -> None:
        if self.rounds < 1 or self.episodes_per_round < 1 or self.eval_episodes < 1 or self.max_steps < 1:
            raise DaggerError("--rounds, --episodes_per_round, --eval_episodes and --max_steps must be >= 1", code=2)
        if not 0.0 <= self.mix < 1.0:
            raise DaggerError(f"--mix {self.mix}: the share of original windows must be in [0, 1)", code=2)
        if self.epochs_per_round <= 0:
            raise DaggerError("--epochs_per_round must be > 0", code=2)
        for split in ("train", "test"):
            if not (Path(self.dataset_dir) / f"{split}.jsonl").is_file():
                raise DaggerError(
                    f"{Path(self.dataset_dir) / f'{split}.jsonl'}: not found (pass the converter's "
                    "output folder the model was trained on as --dataset_dir)",
                    code=2,
                )
        play_end = self.play_seed + 1000 * (self.rounds + 1)  # round r plays from play_seed + 1000 r
        if self.eval_seed < play_end and self.play_seed < self.eval_seed + self.eval_episodes:
            raise DaggerError(
                f"--eval_seed {self.eval_seed}: evaluation seeds overlap the play seeds "
                f"({self.play_seed}..{play_end - 1}); choose one from {play_end}",
                code=2,
            )


@dataclass
class Ctx:
    cfg: DaggerConfig
    out: Path
    base_model: str
    train_settings: dict[str, Any]
    labeler: Labeler
    echo: Callable[[str], None]


def _done(folder: Path) -> dict[str, Any] | None:
    marker = folder / DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark(folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(folder / DONE, {**result, "finished_at": now_iso()})
    return result


def _step(ctx: Ctx, folder: Path, title: str, work: Callable[[], dict[str, Any]], keep: bool = False) -> dict:
    """Run `work` unless `folder` holds a finished result; a half-done folder is cleared first (kept
    with `keep`: training resumes from its checkpoints)."""
    found = _done(folder)
    if found is not None:
        ctx.echo(f"  {title}: done earlier, skipped")
        return found
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ctx.echo(f"  {title} ...")
    result = work()
    result["seconds"] = round(time.time() - started, 1)
    ctx.echo(f"  {title}: done in {result['seconds']:.0f} s")
    return _mark(folder, result)


# --------------------------------------------------------------------------- the steps
def _play(
    ctx: Ctx,
    model: str | None,
    policy: str,
    folder: Path,
    episodes: int,
    seed: int,
    record: bool,
    gif: int = 0,
    unstick: bool = False,
) -> dict[str, Any]:
    from .play.run import PlayConfig, run_play

    cfg = PlayConfig(
        env="demo",
        policies=(policy,),
        episodes=episodes,
        max_steps=ctx.cfg.max_steps,
        goals_per_episode=ctx.cfg.goals_per_episode,
        seed=seed,
        output_dir=str(folder),
        record_dir=str(folder / "recorded") if record else None,
        gif=gif,
        model_path=model,
        default_frame_layout=ctx.train_settings.get("frame_layout") or "images",
        unstick=unstick,
    )
    report = run_play(cfg, show_progress=False, echo=ctx.echo)
    return report["policies"][policy]


def _convert(runs_parent: Path, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from .convert import convert_corpus

    summary = convert_corpus(
        runs_parent,
        out,
        min_frames=1,
        val_fraction=0.0,
        test_fraction=0.0,
        max_gap_seconds=0.0,
        progress=False,
        warn=lambda line: None,
    )
    rows = (
        [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
        if (out / "train.jsonl").is_file()
        else []
    )
    return rows, summary


def distinct_windows(rows: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """Windows with distinct (frame bytes, label): a player stuck for 100 presses visited one state,
    not 100 (the first occurrence is kept, in order)."""
    digests: dict[str, str] = {}

    def digest(path: str) -> str:
        full = path if Path(path).is_absolute() else str(base / path)
        if full not in digests:
            digests[full] = hashlib.blake2b(Path(full).read_bytes(), digest_size=16).hexdigest()
        return digests[full]

    seen, out = set(), []
    for row in rows:
        key = (tuple(digest(f) for f in row["frames"]), row["metadata"]["button"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def collect_dagger(ctx: Ctx, folder: Path, model: str, round_no: int) -> dict[str, Any]:
    seed = ctx.cfg.play_seed + 1000 * round_no
    play = _play(
        ctx, model, "model", folder / "play", ctx.cfg.episodes_per_round, seed, record=True, unstick=ctx.cfg.unstick
    )
    runs = folder / "play" / "recorded" / "model" / "runs"
    relabelled = folder / "relabelled" / "runs"
    ctx.labeler.failures.clear()
    sessions = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    done = [relabel_session(session, relabelled, ctx.labeler) for session in sessions]
    converted, summary = _convert(folder / "relabelled", folder / "data")
    rows = distinct_windows(converted, folder / "data")
    atomic_write_jsonl(folder / "data" / "train.jsonl", rows)
    return {
        "windows": len(rows),
        "windows_before_dedup": len(converted),
        "labelled_turns": sum(d.labelled for d in done),
        "unlabelled_turns": sum(d.unlabelled for d in done),
        "label_failures": dict(ctx.labeler.failures),
        "relabelled_differently": sum(d.changed for d in done),
        "skipped_windows": summary["windows"]["skipped_by_reason"],
        "play": _brief(play),
        "seed": seed,
    }


def collect_bc(ctx: Ctx, folder: Path, want: int, round_no: int) -> dict[str, Any]:
    """Expert episodes (10 at a time) until they give `want` windows; exactly `want` are kept."""
    seed = ctx.cfg.play_seed + 1000 * round_no + 500
    rows: list[dict[str, Any]] = []
    batches = 0
    while len(rows) < want:
        batch = folder / f"expert_{batches}"
        _play(ctx, None, "expert", batch, 10, seed + 10 * batches, record=True)
        batches += 1
        rows = []
        for i in range(batches):
            part, _ = _convert(folder / f"expert_{i}" / "recorded" / "expert", folder / f"data_{i}")
            rows += part
        if batches > 10 * max(1, want):  # the expert always produces windows: a bug, not a slow round
            raise DaggerError(f"{folder}: expert play gave {len(rows)} of {want} windows")
    kept = rows[:want]
    atomic_write_jsonl(folder / "data" / "train.jsonl", kept)
    return {"windows": len(kept), "expert_episodes": 10 * batches, "seed": seed}


def _absolute(rows: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    for row in rows:
        row["frames"] = [f if Path(f).is_absolute() else str((base / f).resolve()) for f in row["frames"]]
    return rows


def aggregate(ctx: Ctx, folder: Path, chain: str, round_no: int) -> dict[str, Any]:
    """This chain's windows of rounds 1..round_no plus a seeded sample of the original training set."""
    new: list[dict[str, Any]] = []
    for r in range(1, round_no + 1):
        data = ctx.out / f"round_{r}" / chain / "collect" / "data" / "train.jsonl"
        if data.is_file():
            new += _absolute([json.loads(x) for x in data.read_text().splitlines() if x.strip()], data.parent)
    original_path = Path(ctx.cfg.dataset_dir) / "train.jsonl"
    original = _absolute(
        [json.loads(x) for x in original_path.read_text().splitlines() if x.strip()], original_path.parent
    )
    n_old = min(len(original), math.ceil(len(new) * ctx.cfg.mix / (1 - ctx.cfg.mix)))
    old = random.Random(f"dagger-mix:{round_no}").sample(original, n_old)
    rows = new + old
    random.Random(f"dagger-order:{round_no}").shuffle(rows)
    atomic_write_jsonl(folder / "train.jsonl", rows)
    return {"train_windows": len(rows), "new_windows": len(new), "original_windows": n_old}


def train(ctx: Ctx, folder: Path, init_adapter: str, dataset: Path, max_steps: int, round_no: int) -> dict:
    """The training CLI, continuing `init_adapter` for `max_steps` (resumes from its own checkpoints)."""
    s = ctx.train_settings
    argv = [
        ctx.cfg.python,
        str(REPO_ROOT / "scripts" / "sft_pokemon_gemma3.py"),
        "--model_name",
        ctx.base_model,
        "--init_adapter",
        init_adapter,
        "--dataset_path",
        str(dataset),
        "--eval_dataset_path",
        "",
        "--output_dir",
        str(folder / "run"),
        "--max_steps",
        str(max_steps),
        "--save_steps",
        "50",
        "--save_total_limit",
        "1",
        "--eval_steps",
        "0",
        "--logging_steps",
        "20",
        "--report_to",
        "none",
        "--seed",
        str(1000 + round_no),
        "--resume_from_checkpoint",
        "latest",
    ]
    for key in INHERITED:
        if s.get(key) not in (None, ""):
            argv += [f"--{key}", str(s[key])]
    log = folder / "train.log"
    with open(log, "w") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if proc.returncode != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        why = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1] if lines else "no output")
        raise DaggerError(f"training round {round_no} failed (exit {proc.returncode}): {why} (log: {log})")
    info = json.loads((folder / "run" / "training_info.json").read_text())
    return {"adapter": str(folder / "run"), "steps": info.get("step"), "log": str(log)}


def evaluate_round(ctx: Ctx, folder: Path, model: str) -> dict[str, Any]:
    from . import evaluate as ev

    play = _play(
        ctx,
        model,
        "model",
        folder / "play",
        ctx.cfg.eval_episodes,
        ctx.cfg.eval_seed,
        record=False,
        gif=2,
        unstick=ctx.cfg.unstick,
    )
    other = _play(
        ctx,
        model,
        "model",
        folder / "play_other",
        ctx.cfg.eval_episodes,
        ctx.cfg.eval_seed,
        record=False,
        unstick=not ctx.cfg.unstick,
    )
    data = Path(ctx.cfg.dataset_dir)
    cfg = ev.EvalConfig(
        model_name=model,
        dataset_path=str(data / "test.jsonl"),
        output_dir=str(folder / "offline"),
        train_dataset_path=str(data / "train.jsonl"),
        limit=ctx.cfg.max_eval_samples or None,
        default_frame_layout=ctx.train_settings.get("frame_layout") or "images",
    )
    try:
        report = ev.evaluate(cfg, progress=False)
    except ev.EvalError as exc:
        raise DaggerError(f"offline evaluation of {model}: {exc}") from None
    label = "unstick" if not ctx.cfg.unstick else "greedy"
    return {
        **_brief(play),
        **{f"{label}_{k}": v for k, v in _brief(other).items()},
        "offline_accuracy": report["accuracy"],
        "offline_n": report["n"],
    }


def _brief(play: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "success_rate",
        "episode_success_rate",
        "steps_ratio",
        "steps_per_goal",
        "stuck_rate",
        "expert_agreement",
        "goals_done",
        "steps",
        "episodes",
    )
    return {k: play.get(k) for k in keys}


# --------------------------------------------------------------------------- the run
def load_context(cfg: DaggerConfig, echo: Callable[[str], None]) -> Ctx:
    cfg.check()
    try:
        base = adapter_base_model(cfg.model_path)
    except ArtifactError as exc:
        raise DaggerError(f"{exc} (--model_path must be a trained LoRA run or adapter)", code=2) from None
    run_config, _ = find_run_config(cfg.model_path)
    settings = {k: (run_config or {}).get(k) for k in INHERITED}
    settings.update(cfg.train_overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return Ctx(cfg, out, base, settings, make_labeler(cfg.labeler), echo)


def steps_for(windows: int, ctx: Ctx) -> int:
    s = ctx.train_settings
    per_step = int(s.get("batch_size") or 1) * int(s.get("grad_accum") or 1)
    return max(1, math.ceil(windows * ctx.cfg.epochs_per_round / per_step))


def chain_round(ctx: Ctx, r: int, chain: str, model: str, dagger: dict[str, Any] | None) -> dict[str, Any]:
    """One round of one chain: collect, aggregate, train, evaluate. `dagger`: that round's DAgger
    entry, whose window count and step count the BC chain matches."""
    folder = ctx.out / f"round_{r}" / chain
    if chain == "dagger":
        collect = _step(
            ctx,
            folder / "collect",
            "dagger: play + relabel + convert",
            lambda: collect_dagger(ctx, folder / "collect", model, r),
        )
    else:
        want = dagger["collect"]["windows"]
        collect = _step(
            ctx,
            folder / "collect",
            f"bc: expert play for {want} windows",
            lambda: collect_bc(ctx, folder / "collect", want, r),
        )
    agg = _step(
        ctx, folder / "aggregate", f"{chain}: aggregate", lambda: aggregate(ctx, folder / "aggregate", chain, r)
    )
    steps = dagger["steps"] if dagger else steps_for(agg["train_windows"], ctx)
    trained = _step(
        ctx,
        folder / "train",
        f"{chain}: train {steps} steps",
        lambda: train(ctx, folder / "train", model, folder / "aggregate" / "train.jsonl", steps, r),
        keep=True,
    )
    evaluated = _step(
        ctx,
        folder / "evaluate",
        f"{chain}: evaluate",
        lambda: evaluate_round(ctx, folder / "evaluate", trained["adapter"]),
    )
    ctx.echo(
        f"  {chain}: success {evaluated['success_rate']:.3f}, steps ratio {_fmt(evaluated['steps_ratio'])}, "
        f"offline accuracy {evaluated['offline_accuracy']:.3f}"
    )
    return {"collect": collect, "aggregate": agg, "steps": steps, "adapter": trained["adapter"], "eval": evaluated}


def run_dagger(cfg: DaggerConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every round for every chain (resuming after a kill); returns the report."""
    ctx = load_context(cfg, echo)
    chains = CHAINS if cfg.compare_bc else ("dagger",)
    echo(f"round 0: the starting model {cfg.model_path}")
    folder = ctx.out / "round_0" / "evaluate"
    start = _step(ctx, folder, "evaluate", lambda: evaluate_round(ctx, folder, cfg.model_path))
    rounds: list[dict[str, Any]] = [{"round": 0, **{c: {"eval": start, "adapter": cfg.model_path} for c in chains}}]
    write_report(ctx, rounds)
    for r in range(1, cfg.rounds + 1):
        echo(f"round {r}/{cfg.rounds}")
        entry: dict[str, Any] = {"round": r}
        for chain in chains:
            entry[chain] = chain_round(ctx, r, chain, rounds[-1][chain]["adapter"], entry.get("dagger"))
        rounds.append(entry)
        write_report(ctx, rounds)
    return write_report(ctx, rounds)


# --------------------------------------------------------------------------- the report
def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def write_report(ctx: Ctx, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    chains = [c for c in CHAINS if c in rounds[0]]
    report = {
        "config": {k: v for k, v in asdict(ctx.cfg).items() if k != "python"},
        "base_model": ctx.base_model,
        "labeler": ctx.labeler.name,
        "updated_at": now_iso(),
        "rounds": rounds,
    }
    atomic_write_json(ctx.out / "dagger_report.json", report)
    other = "greedy" if ctx.cfg.unstick else "unstick"
    lines = [
        "# DAgger vs equal-budget behaviour cloning" if "bc" in chains else "# DAgger",
        "",
        f"- start: `{ctx.cfg.model_path}`; labeler: {ctx.labeler.name}; {ctx.cfg.episodes_per_round} played "
        f"episodes per round, evaluation on {ctx.cfg.eval_episodes} held-out seeds ({ctx.cfg.eval_seed}+), "
        f"{ctx.cfg.goals_per_episode} goals within {ctx.cfg.max_steps} presses",
        "",
        f"- play: {'with' if ctx.cfg.unstick else 'without'} the unstick rule (the other setting in the "
        f"`{'greedy' if ctx.cfg.unstick else 'unstick'}` columns)",
        "",
        "| round | chain | new windows (total) | train windows | steps | success | steps ratio | steps/goal | stuck | "
        f"{other} success | {other} steps/goal | offline acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in rounds:
        for chain in chains:
            c = entry[chain]
            e = c["eval"]
            agg = c.get("aggregate", {})
            lines.append(
                f"| {entry['round']} | {chain} | {c.get('collect', {}).get('windows', '-')} "
                f"({agg.get('new_windows', '-')}) | {agg.get('train_windows', '-')} | {c.get('steps', '-')} | "
                f"{_fmt(e['success_rate'], '.3f')} | {_fmt(e['steps_ratio'])} | {_fmt(e['steps_per_goal'], '.1f')} | "
                f"{_fmt(e['stuck_rate'], '.3f')} | {_fmt(e.get(f'{other}_success_rate'), '.3f')} | "
                f"{_fmt(e.get(f'{other}_steps_per_goal'), '.1f')} | {_fmt(e['offline_accuracy'], '.3f')} |"
            )
    lines += ["", "![success rate and steps ratio per round](dagger_report.png)", ""]
    atomic_write_text(ctx.out / "dagger_report.md", "\n".join(lines))
    from .plots import dagger_rounds_png

    series = {
        chain: [(e["round"], e[chain]["eval"]["success_rate"], e[chain]["eval"]["steps_ratio"]) for e in rounds]
        for chain in chains
    }
    dagger_rounds_png(series, ctx.out / "dagger_report.png")
    return report


__all__ = ["DaggerConfig", "DaggerError", "make_labeler", "relabel_session", "run_dagger"]
