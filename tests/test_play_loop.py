"""The play loop, the non-model policies, recording in the demo world, and the play report."""

import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from pokemon_gemma.convert import convert_corpus
from pokemon_gemma.dataset import BUTTONS
from pokemon_gemma.play.env import DemoWorldEnv
from pokemon_gemma.play.loop import STUCK_RUN, play, play_episode
from pokemon_gemma.play.policies import ExpertPolicy, MajorityPolicy, Policy, PolicyError, ScoredPolicy, make_policy
from pokemon_gemma.play.report import summarize, write_report
from tests.helpers import write_dataset


class Scripted(Policy):
    """Answers from a list (cycled), remembering what it was shown."""

    name = "scripted"

    def __init__(self, answers):
        self.answers, self.calls, self.seen = list(answers), 0, []

    def act(self, frames, context, info):
        self.seen.append((frames, context, info))
        self.calls += 1
        return self.answers[(self.calls - 1) % len(self.answers)]


def test_the_policy_sees_the_last_4_frames_oldest_first_and_the_training_context():
    env = DemoWorldEnv(max_steps=6)
    policy = Scripted(["left", "up", "right", "down"])
    first, info = env.reset(seed=2)
    stats = play_episode(env, policy, seed=2, keep_frames=True)
    assert stats.steps == 6 and stats.truncated and len(stats.latencies_s) == 6
    frames = stats.frames  # frames[i] was shown before press i; frames[-1] after the last press
    assert (frames[0] == first).all()
    for step, (window, context, info) in enumerate(policy.seen):
        assert len(window) == 4
        expected = [frames[max(0, step - 3 + k)] for k in range(4)]  # the first frame repeats at the start
        assert all((w == e).all() for w, e in zip(window, expected))
        assert context == f"Goal: {info['goal_sentence']}" and info["step"] == step
        assert info["last_button"] == (None if step == 0 else policy.answers[(step - 1) % 4])


def test_invalid_answers_are_counted_retried_once_then_end_the_episode():
    env = DemoWorldEnv(max_steps=5)
    stats = play_episode(env, Scripted(["jump", "up"]), seed=0)
    assert stats.steps == 5 and stats.invalid_answers == 5 and stats.error is None
    assert stats.pressed == ["up"] * 5 and stats.invalid_examples[0] == "'jump'"
    stats = play_episode(env, Scripted(["UP ", None]), seed=0)
    assert stats.steps == 0 and stats.invalid_answers == 2
    assert stats.error == "policy scripted answered None twice in a row (not one of BUTTONS)"


def test_stuck_steps_are_presses_in_runs_of_8_that_change_nothing():
    env = DemoWorldEnv(max_steps=30)
    nothing = play_episode(env, Scripted(["start"]), seed=0)  # no dialogue open: start changes nothing
    assert nothing.stuck_steps == 30 and nothing.stuck_rate == 1.0
    turns = ["left", "right"]  # turning changes the frame even where the way is blocked
    short = play_episode(env, Scripted(["start"] * (STUCK_RUN - 1) + turns), seed=0)
    assert short.stuck_steps == 0  # runs of 7 unchanged frames
    long = play_episode(env, Scripted(["start"] * STUCK_RUN + turns), seed=0)
    assert long.stuck_steps == 3 * STUCK_RUN  # three runs of 8 in 30 presses


def test_policies():
    policy = make_policy("random", seed=4)
    env = DemoWorldEnv(max_steps=30)
    a = [play_episode(env, policy, seed=s).pressed for s in (0, 1, 0)]
    assert a[0] == a[2] != a[1] and set(a[0]) <= set(BUTTONS)
    assert play_episode(env, make_policy("repeat_last"), seed=0).pressed == ["up"] * 30
    assert play_episode(env, make_policy("repeat_last", first="a"), seed=0).pressed == ["a"] * 30
    with pytest.raises(PolicyError, match="demo world"):
        ExpertPolicy().act([], "", {"step": 0})
    with pytest.raises(PolicyError, match="unknown policy 'gemma'"):
        make_policy("gemma")


def test_majority_policy_reads_the_training_split(tmp_path):
    path = write_dataset(tmp_path / "data", 40, seed=1)
    labels = [json.loads(json.loads(line)["output"])["button"] for line in path.open()]
    counts = {b: labels.count(b) for b in BUTTONS}
    best = max(BUTTONS, key=lambda b: (counts[b], -BUTTONS.index(b)))
    policy = make_policy("majority", path=path)
    assert policy.button == best and policy.act([], "", {}) == best
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + "\n" + json.dumps({"output": '{"button": "jump"}'}) + "\n")
    with pytest.raises(PolicyError, match=r"bad.jsonl:2: output: .*jump"):
        MajorityPolicy.from_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PolicyError, match="no records"):
        MajorityPolicy.from_jsonl(tmp_path / "empty.jsonl")


class CtrlC(Scripted):
    """Presses `up`; sends this process a SIGINT (Ctrl-C) during its 5th answer."""

    def act(self, frames, context, info):
        if self.calls == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return super().act(frames, context, info)


def test_ctrl_c_finishes_the_step_and_returns_what_was_played(tmp_path):
    env = DemoWorldEnv(max_steps=50)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a backgrounded run
    episodes = play(env, CtrlC(["up"]), 3, seed=0, runs_dir=tmp_path / "runs")
    assert len(episodes) == 1 and episodes[0].interrupted and episodes[0].steps == 5
    data = json.loads((Path(episodes[0].session_dir) / "session_data.json").read_text())
    assert data["session_metadata"]["status"] == "interrupted" and len(data["turns"]) == 5
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored


def test_demo_recording_keeps_the_expert_button_and_converts_to_the_pressed_buttons(tmp_path):
    env = DemoWorldEnv(max_steps=20)
    episodes = play(env, make_policy("random", seed=2), 2, seed=5, runs_dir=tmp_path / "runs")
    summary = convert_corpus(tmp_path / "runs", tmp_path / "out", progress=False, warn=lambda line: None)
    assert summary["problems"]["count"] == 0 and summary["windows"]["produced"] == 2 * (20 - 3)
    rows = [json.loads(line) for line in (tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl").open()]
    by_session = {Path(e.session_dir).name[len("session_") :]: e for e in episodes}
    for row in rows:
        stats = by_session[row["metadata"]["session_id"]]
        turn = row["metadata"]["turns"][-1]
        assert json.loads(row["output"])["button"] == stats.pressed[turn - 1]
        assert row["context"] == f"Goal: {row['metadata']['session_goal']}"
    for stats in episodes:
        data = json.loads((Path(stats.session_dir) / "session_data.json").read_text())
        plays = [t["ai_analysis"]["parsed_json"]["play"] for t in data["turns"]]
        assert [p["expert_button"] for p in plays] == stats.expert  # for relabelling
        assert [p["step"] for p in plays] == list(range(1, 21))
        with Image.open(Path(stats.session_dir) / "sshots" / "step_0001_grid.png") as im:
            assert im.size == (240, 160)


def test_expert_play_records_answers_like_the_demo_sessions_expert(tmp_path):
    """Behaviour cloning trains on these recordings: the expert's reasoning and scene description must be
    written as in the demo sessions, not left empty (an answer format the model never saw)."""
    from pokemon_gemma.demo import explain, view_of

    env = DemoWorldEnv(max_steps=12)
    play(env, ExpertPolicy(), 1, seed=4, runs_dir=tmp_path / "runs")
    convert_corpus(tmp_path / "runs", tmp_path / "out", min_frames=1, progress=False, warn=lambda line: None)
    answers = [
        json.loads(json.loads(line)["output"])
        for line in (tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl").open()
    ]
    assert len(answers) == 12
    env.reset(seed=4)
    view = view_of(env.unwrapped.state.scene)
    reasoning, observations, _ = explain(view, answers[0]["button"])
    assert (answers[0]["reasoning"], answers[0]["scene_description"]) == (reasoning, observations)
    assert all(a["reasoning"] and a["scene_description"].startswith(("Player at tile", "Dialogue")) for a in answers)


def test_report_files(tmp_path):
    env = DemoWorldEnv(max_steps=40)
    results = {
        "expert": play(env, make_policy("expert"), 3, seed=0, keep_frames=2),
        "random": play(env, make_policy("random", seed=0), 3, seed=0, keep_frames=1),
    }
    report = write_report(results, tmp_path / "report", gif_episodes=2, meta={"env": "pokemon_gemma/DemoWorld-v0"})
    saved = json.loads((tmp_path / "report" / "play_report.json").read_text())
    assert saved["policies"] == json.loads(json.dumps(report["policies"]))
    expert = saved["policies"]["expert"]
    assert expert["success_rate"] == 1.0 and expert["steps_ratio"] == 1.0 and expert["invalid_answers"] == 0
    assert expert["goals_done"] == 9 and expert["steps"] == sum(expert["buttons"].values())
    assert expert["latency_ms_p50"] <= expert["latency_ms_p95"]
    random_ = summarize(results["random"])
    assert random_["success_rate"] == random_["goals_done"] / 9
    md = (tmp_path / "report" / "play_report.md").read_text()
    assert "| expert | 3 | 100.0% | 100.0% |" in md and "| random | 3 |" in md
    with Image.open(tmp_path / "report" / "play_report.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert saved["gifs"] == ["gifs/expert_e000.gif", "gifs/expert_e001.gif", "gifs/random_e000.gif"]
    with Image.open(tmp_path / "report" / "gifs" / "expert_e000.gif") as gif:
        assert gif.is_animated and gif.n_frames == results["expert"][0].steps + 1
        assert gif.size == (240, 160 + 18)  # the button is written under the frame
    assert "frames" not in saved["episodes"]["expert"][0]


class FixedRanking(ScoredPolicy):
    """Always the same ranking (`a` first): pressed facing nothing, `a` changes nothing."""

    name = "fixed"

    def probabilities(self, frames, context):
        return {b: 1.0 / (i + 1) for i, b in enumerate(("a", "up", "left", "right", "down", "b", "start", "select"))}


def test_unstick_never_presses_a_button_twice_on_the_same_screen():
    env = DemoWorldEnv(max_steps=40)
    stuck = play_episode(env, FixedRanking(unstick=False), seed=2)
    assert set(stuck.pressed) == {"a"} and stuck.stuck_rate > 0.8  # the top button forever
    free = play_episode(env, FixedRanking(unstick=True), seed=2, keep_frames=True)
    seen: dict[bytes, set] = {}
    for frame, button in zip(free.frames, free.pressed):
        pressed_here = seen.setdefault(frame.tobytes(), set())
        assert button not in pressed_here or len(pressed_here) == 8  # a repeat only after all 8 were tried
        pressed_here.add(button)
    assert free.pressed[:2] == ["a", "up"]  # `a` changed nothing: the next-ranked button
    assert free.stuck_rate < stuck.stuck_rate
