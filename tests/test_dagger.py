"""DAgger: relabelling (expert, command and url labelers, failures counted), and rounds end to end on the
tiny model with the equal-budget BC chain, resumed after a kill in round 2."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pokemon_gemma.convert import convert_corpus
from pokemon_gemma.dagger import CommandLabeler, ExpertLabeler, UrlLabeler, relabel_session
from pokemon_gemma.play.env import DemoWorldEnv
from pokemon_gemma.play.loop import play_episode
from pokemon_gemma.play.policies import RandomPolicy
from tests.conftest import REPO_ROOT

LABELER = Path(__file__).with_name("dagger_labeler.py")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """One random-policy episode of 30 presses, recorded (the expert's button stored per state)."""
    root = tmp_path_factory.mktemp("recorded")
    play_episode(DemoWorldEnv(max_steps=30), RandomPolicy(seed=3), seed=5, runs_dir=root / "runs")
    return next((root / "runs").glob("session_*"))


def turns_of(session: Path) -> list[dict]:
    return json.loads((session / "session_data.json").read_text())["turns"]


def decisions(session: Path) -> list[list[str]]:
    return [t["ai_analysis"]["parsed_json"]["button_presses"] for t in turns_of(session)]


def labels_by_turn(runs_parent: Path, out: Path) -> dict[int, str]:
    return {t: answer["button"] for t, answer in answers_by_turn(runs_parent, out).items()}


def answers_by_turn(runs_parent: Path, out: Path) -> dict[int, dict]:
    """The training answer (parsed JSON) of each converted window, by its last turn."""
    convert_corpus(
        runs_parent,
        out,
        min_frames=1,
        val_fraction=0,
        test_fraction=0,
        max_gap_seconds=0,
        progress=False,
        warn=lambda line: None,
    )
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    return {r["metadata"]["turns"][-1]: json.loads(r["output"]) for r in rows}


def test_relabelled_windows_carry_the_expert_button_not_the_pressed_one(recorded, tmp_path):
    turns = turns_of(recorded)
    expert = {t["turn"]: t["ai_analysis"]["parsed_json"]["play"]["expert_button"] for t in turns}
    pressed = {t["turn"]: t["ai_analysis"]["parsed_json"]["button_presses"][0] for t in turns}
    done = relabel_session(recorded, tmp_path / "relabelled" / "runs", ExpertLabeler())
    assert (done.labelled, done.unlabelled) == (30, 0)
    assert done.changed == sum(expert[t] != pressed[t] for t in expert) > 10  # a random player is mostly wrong
    answers = answers_by_turn(tmp_path / "relabelled", tmp_path / "data")
    labels = {t: a["button"] for t, a in answers.items()}
    assert labels == expert  # every window, labelled with the expert's button for its last frame's state
    # ...with the expert's own words, as in the demo sessions it was trained on (not the player's text)
    play = {t["turn"]: t["ai_analysis"]["parsed_json"]["play"] for t in turns}
    assert {t: (a["reasoning"], a["scene_description"]) for t, a in answers.items()} == {
        t: (play[t]["expert_reasoning"], play[t]["expert_observations"]) for t in answers
    }
    assert all(a["reasoning"].startswith(("The shortest path", "Next to", "Standing", "A ")) for a in answers.values())
    assert labels_by_turn(recorded.parent.parent, tmp_path / "as_played") == pressed  # the recording itself


class LabelerHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        sys.path.insert(0, str(LABELER.parent))
        from dagger_labeler import answer

        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, body = answer(request)
        self.send_response(200 if status == 0 else 500)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_command_and_url_labelers_agree_and_failures_are_counted_not_used(recorded, tmp_path):
    command = CommandLabeler(f"{sys.executable} {LABELER}")
    by_command = relabel_session(recorded, tmp_path / "cmd" / "runs", command)
    server = ThreadingHTTPServer(("127.0.0.1", 0), LabelerHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = UrlLabeler(f"http://127.0.0.1:{server.server_address[1]}/label")
        by_url = relabel_session(recorded, tmp_path / "url" / "runs", url)
    finally:
        server.shutdown()
    assert decisions(by_command.folder) == decisions(by_url.folder)
    crashed = [n for n in range(1, 31) if n % 5 == 0]  # the labeler exits 1 (or answers HTTP 500) on these
    jumped = [n for n in range(1, 31) if n % 7 == 0 and n % 5 != 0]  # and answers "jump" on these
    for labeler in (command, url):
        assert dict(labeler.failures) == {"labeler_failed": len(crashed), "invalid_button": len(jumped)}
    assert (by_command.labelled, by_command.unlabelled) == (30 - len(crashed) - len(jumped), len(crashed) + len(jumped))
    labels = labels_by_turn(tmp_path / "cmd", tmp_path / "data")
    assert sorted(set(range(1, 31)) - set(labels)) == sorted(crashed + jumped)  # skipped, never labelled
    sys.path.insert(0, str(LABELER.parent))
    from dagger_labeler import button_for

    frames = {t["turn"]: by_command.folder / "sshots" / f"step_{t['turn']:04d}_grid.png" for t in turns_of(recorded)}
    assert labels == {n: button_for(frames[n]) for n in labels}


@pytest.mark.slow
def test_rounds_end_to_end_with_bc_and_resume_after_a_kill_in_round_2(tiny_model_dir, tmp_path):
    from pokemon_gemma.demo import write_demo_sessions
    from pokemon_gemma.modeling import apply_lora, load_model, load_processor

    write_demo_sessions(tmp_path / "sessions", 12, seed=1)
    convert_corpus(
        tmp_path / "sessions", tmp_path / "data", copy_images=True, val_fraction=0.2, test_fraction=0.2, progress=False
    )
    adapter = tmp_path / "run0"
    apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0).save_pretrained(adapter)
    load_processor(str(tiny_model_dir)).save_pretrained(adapter)
    out = tmp_path / "dagger"
    argv = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "dagger.py"),
        "--model_path",
        str(adapter),
        "--dataset_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(out),
        "--rounds",
        "2",
        "--episodes_per_round",
        "2",
        "--max_steps",
        "12",
        "--eval_episodes",
        "2",
        "--max_eval_samples",
        "6",
        "--batch_size",
        "8",
        "--grad_accum",
        "1",
        "--dataloader_workers",
        "0",
        "--learning_rate",
        "1e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    marker = out / "round_2" / "dagger" / "collect" / ".done.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.stdout.read() if proc.poll() is not None else "round 2 never started"
    os.killpg(proc.pid, signal.SIGKILL)  # killed inside round 2
    proc.wait()
    round1 = {p: json.loads(p.read_text())["finished_at"] for p in (out / "round_1").rglob(".done.json")}
    assert len(round1) == 8  # 4 steps x 2 chains
    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done earlier, skipped") >= 9  # round 0 + all of round 1 + round 2's collect
    assert {p: json.loads(p.read_text())["finished_at"] for p in (out / "round_1").rglob(".done.json")} == round1
    report = json.loads((out / "dagger_report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    for entry in report["rounds"][1:]:
        d, b = entry["dagger"], entry["bc"]
        assert d["collect"]["windows"] == b["collect"]["windows"] > 0  # equal budget: windows ...
        assert d["steps"] == b["steps"] and d["aggregate"]["train_windows"] == b["aggregate"]["train_windows"]
        for chain in (d, b):
            assert 0.0 <= chain["eval"]["success_rate"] <= 1.0 and chain["eval"]["offline_n"] == 6
            assert Path(chain["adapter"], "adapter_model.safetensors").is_file()
    assert report["rounds"][2]["dagger"]["aggregate"]["new_windows"] == sum(
        report["rounds"][r]["dagger"]["collect"]["windows"] for r in (1, 2)
    )
    assert (out / "dagger_report.png").stat().st_size > 1000 and "| 2 | bc |" in (out / "dagger_report.md").read_text()
