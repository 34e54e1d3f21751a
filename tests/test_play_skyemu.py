"""The SkyEmu client, env and harness over real HTTP on loopback, against the demo-world stand-in
(scripts/skyemu_standin.py, a child process) and small misbehaving servers: nothing mocked."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pokemon_gemma.convert import convert_corpus
from pokemon_gemma.dataset import BUTTONS
from pokemon_gemma.play.env import DemoWorldEnv
from pokemon_gemma.play.loop import play
from pokemon_gemma.play.policies import RandomPolicy
from pokemon_gemma.play.skyemu import SkyEmuClient, SkyEmuEnv, SkyEmuError
from pokemon_gemma.serve.launch import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "scripts" / "skyemu_standin.py"
GOAL = "explore the town and talk to everyone you meet"


def standin(tmp_path: Path, seed: int) -> ServerProcess:
    return ServerProcess(
        ["--seed", str(seed)], log_path=tmp_path / f"standin_{seed}.log", script=STANDIN, ready_timeout_s=60
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with standin(tmp_path_factory.mktemp("standin"), seed=5) as srv:
        yield srv


@pytest.mark.slow  # starts the stand-in as a child process
def test_endpoints_answer_like_skyemu(server):
    with SkyEmuClient(server.url) as client:
        client.ping()
        status = client.status()
        assert {"emulator", "run-mode", "rom-loaded", "inputs"} <= set(status)
        assert {"Up", "Down", "Left", "Right", "A", "B", "Start", "Select"} <= set(status["inputs"])
        png = client.screen_png()
        assert png.startswith(b"\x89PNG")
        client.set_input({"A": 1})
        assert client.status()["inputs"]["A"] == 1.0
        client.set_input({"A": 0})
        client.step(3)
        assert client.screen().shape == (160, 240, 3)


@pytest.mark.slow  # starts the stand-in as a child process
def test_presses_over_http_show_exactly_the_env_frames(tmp_path):
    with standin(tmp_path, seed=9) as srv, SkyEmuEnv(srv.url, goal=GOAL) as env:
        local = DemoWorldEnv(max_steps=10**6)
        obs, _ = env.reset()
        expected, info = local.reset(seed=9)
        assert (obs == expected).all()
        for _ in range(30):  # the expert's presses, so goals get done and dialogues open and close
            action = BUTTONS.index(info["expert_button"])
            obs, reward, terminated, _, skyemu_info = env.step(action)
            expected, _, _, _, info = local.step(action)
            assert (obs == expected).all() and reward == 0.0 and not terminated
        demo = env.client.status()["demo"]
        assert demo["presses"] == 30 and demo["goals_done"] == info["goals_done"] >= 2
        assert demo["frames"] == 30 * 24  # Eevee's timing: 12 frames held + 12 released per press
        assert skyemu_info["context"] == f"Goal: {GOAL}" and skyemu_info["button"] == BUTTONS[action]


def converted_labels(runs: Path, out: Path) -> dict[tuple[str, int], str]:
    summary = convert_corpus(runs, out, progress=False, warn=lambda line: None)
    assert summary["problems"]["count"] == 0, summary["problems"]
    rows = [json.loads(line) for line in (out / "pokemon_4frame_dataset_full.jsonl").open()]
    return {(r["metadata"]["session_id"], r["metadata"]["turns"][-1]): json.loads(r["output"])["button"] for r in rows}


@pytest.mark.slow  # starts the stand-in as a child process
def test_harness_plays_over_http_and_the_recording_converts_to_the_pressed_buttons(server, tmp_path):
    with SkyEmuEnv(server.url, goal=GOAL, max_steps=12) as env:
        episodes = play(env, RandomPolicy(seed=3), 2, seed=0, runs_dir=tmp_path / "runs")
    assert [e.steps for e in episodes] == [12, 12] and all(e.truncated for e in episodes)
    labels = converted_labels(tmp_path / "runs", tmp_path / "out")
    for e in episodes:
        sid = Path(e.session_dir).name[len("session_") :]
        assert {t: labels[(sid, t)] for t in range(4, 13)} == {t: e.pressed[t - 1] for t in range(4, 13)}
    row = json.loads((tmp_path / "out" / "pokemon_4frame_dataset_full.jsonl").open().readline())
    assert row["context"] == f"Goal: {GOAL}"
    data = json.loads((Path(episodes[0].session_dir) / "session_data.json").read_text())
    assert data["session_metadata"]["status"] == "completed" and len(data["turns"]) == 12
    assert data["turns"][0]["ai_analysis"]["parsed_json"]["play"]["policy"] == "random"


class KillsTheEmulator(RandomPolicy):
    """Random presses; before press `at` it kills the emulator process (SIGKILL)."""

    name = "killer"

    def __init__(self, server: ServerProcess, at: int):
        super().__init__(seed=1)
        self.server, self.at, self.calls = server, at, 0

    def act(self, frames, context, info):
        self.calls += 1
        if self.calls == self.at:
            self.server.proc.kill()
            self.server.proc.wait()
        return super().act(frames, context, info)


@pytest.mark.slow  # starts the stand-in as a child process
def test_emulator_killed_mid_run_gives_a_one_line_error_and_a_valid_partial_recording(tmp_path):
    srv = standin(tmp_path, seed=2).wait_ready()
    try:
        env = SkyEmuEnv(srv.url, goal=GOAL, max_steps=100, retries=3, backoff_s=0.05)
        with pytest.raises(SkyEmuError) as caught:
            play(env, KillsTheEmulator(srv, at=8), 1, runs_dir=tmp_path / "runs")
    finally:
        srv.stop()
    message = str(caught.value)
    assert "\n" not in message and srv.url in message and "unreachable" in message and "after 3 tries" in message
    sessions = list((tmp_path / "runs").iterdir())
    assert len(sessions) == 1
    data = json.loads((sessions[0] / "session_data.json").read_text())
    assert len(data["turns"]) == 7 and data["session_metadata"]["status"] == "error"
    labels = converted_labels(tmp_path / "runs", tmp_path / "out")
    assert len(labels) == 4  # windows ending at turns 4..7
    assert [labels[(data["session_id"], t)] for t in range(4, 8)] == [
        data["turns"][t - 1]["button_presses"][0] for t in range(4, 8)
    ]


class Misbehaving(BaseHTTPRequestHandler):
    """Another server on the port: wrong words, HTML screens, an error status, a /step that hangs."""

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/step":
            time.sleep(1.0)
        status, body = {
            "/ping": (200, b"nope"),
            "/screen": (200, b"<html>hello</html>"),
            "/status": (200, b"[1, 2]"),
            "/input": (500, b"boom"),
        }.get(path, (200, b"ok"))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if path == "/screen" else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client gave up waiting (the /step timeout test)
            pass

    def log_message(self, format, *args):
        pass


@pytest.fixture()
def misbehaving():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def one_line_error(call) -> str:
    with pytest.raises(SkyEmuError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.endswith(")"), message
    return message


def test_errors_name_the_url_and_say_what_went_wrong(misbehaving):
    port = free_port()
    started = time.monotonic()
    message = one_line_error(lambda: SkyEmuClient(f"http://127.0.0.1:{port}", retries=3, backoff_s=0.01).ping())
    assert f"http://127.0.0.1:{port}/ping" in message and "unreachable" in message and "after 3 tries" in message
    assert time.monotonic() - started < 5
    client = SkyEmuClient(misbehaving, timeout_s=0.3, retries=3, backoff_s=0.01)
    assert "bad answer from " + misbehaving + "/ping" in one_line_error(client.ping)
    assert "expected 'pong', got 'nope'" in one_line_error(client.ping)
    assert "non-PNG screen from " + misbehaving + "/screen?format=png" in one_line_error(client.screen)
    assert "not a JSON object" in one_line_error(client.status)
    assert "HTTP 500" in one_line_error(lambda: client.press("a"))
    # A /step that times out is not retried: it may have run, and a retry would hold the key longer.
    message = one_line_error(lambda: client.step(12))
    assert misbehaving + "/step?frames=12" in message and "timed out" in message and "after 1 try" in message
    with pytest.raises(ValueError, match="unknown button"):
        client.press("jump")


@pytest.mark.slow  # starts the stand-in as a child process
def test_skyemu_env_shape_follows_the_screen(server):
    with SkyEmuEnv(server.url, max_steps=2) as env:
        assert env.observation_space.shape == (160, 240, 3) and env.action_space.n == 8
        obs, info = env.reset()
        assert env.observation_space.contains(obs) and info["context"] == "Goal: (not recorded)"
        _, _, _, truncated_1, _ = env.step(4)
        _, _, _, truncated_2, _ = env.step(5)
        assert (truncated_1, truncated_2) == (False, True)
        assert env.render() is None  # no render_mode
