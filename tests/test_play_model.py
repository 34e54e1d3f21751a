"""The model in control: the `model` policy (backend layer) and the `server` policy (our inference server
over loopback HTTP) on the demo world, the play CLI's report, and what happens when the server fails."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from pokemon_gemma.backends import load_backend
from pokemon_gemma.dataset import BUTTONS, QUESTION
from pokemon_gemma.play.env import DemoWorldEnv
from pokemon_gemma.play.loop import play_episode
from pokemon_gemma.play.policies import ModelPolicy, PolicyError, ServerPolicy
from pokemon_gemma.serve.launch import ServerProcess
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
PLAY = str(REPO_ROOT / "scripts" / "play.py")


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return load_backend(str(tiny_model_dir))


@pytest.mark.parametrize("family_dir", ["tiny_model_dir", "tiny_gemma4_dir"])
def test_model_policy_uses_cached_frame_features_and_scores_like_the_backend(family_dir, request):
    """The policy's per-frame feature cache gives the backend's own uncached scores; after the first
    press only the one new frame goes through the vision tower (Gemma 3 and Gemma 4)."""
    backend = load_backend(str(request.getfixturevalue(family_dir)))
    env = DemoWorldEnv(max_steps=6)
    policy = ModelPolicy(backend, unstick=False)
    policy.reset(0)
    obs, info = env.reset(seed=3)
    window = [obs] * 4
    encoded = []
    original = backend.encode_frames
    backend.encode_frames = lambda images: encoded.append(len(images)) or original(images)
    try:
        for _ in range(5):
            button = policy.act(window, info["context"], info)
            images = [Image.fromarray(f) for f in window]
            direct = backend.score(images, info["context"], QUESTION)  # no features: the full vision pass
            assert button == direct.button
            obs, _, _, _, info = env.step(BUTTONS.index(button))
            window = window[1:] + [obs]
    finally:
        backend.encode_frames = original
    assert encoded[0] == 1  # the first window repeats one frame: encoded once
    assert all(n <= 1 for n in encoded[1:]) and len(encoded) <= 5


def test_server_policy_presses_the_same_buttons_as_the_local_model(tiny_model_dir, backend, tmp_path):
    env = DemoWorldEnv(max_steps=15)
    local = play_episode(env, ModelPolicy(backend), seed=11)  # unstick on both sides: the same rule
    with ServerProcess(["--model_path", str(tiny_model_dir)], log_path=tmp_path / "server.log") as srv:
        srv.wait_ready()
        remote = play_episode(env, ServerPolicy(srv.url), seed=11, runs_dir=tmp_path / "runs")
    assert remote.steps == local.steps == 15
    assert remote.pressed == local.pressed
    assert remote.invalid_answers == 0
    session = next((tmp_path / "runs").glob("session_*"))
    turns = json.loads((session / "session_data.json").read_text())["turns"]
    assert len(turns) == 15


class KillsServerAt(ServerPolicy):
    """The server policy, whose server is stopped (SIGTERM, then gone) before press `at`."""

    def __init__(self, srv: ServerProcess, at: int):
        super().__init__(srv.url)
        self.srv, self.at, self.presses = srv, at, 0

    def act(self, frames, context, info):
        self.presses += 1
        if self.presses == self.at:
            self.srv.stop()
        return super().act(frames, context, info)


def test_server_errors_are_counted_retried_then_one_line(tiny_model_dir, tmp_path):
    from pokemon_gemma.convert import convert_corpus

    env = DemoWorldEnv(max_steps=8)
    with ServerProcess(
        ["--model_path", str(tiny_model_dir), "--api_key_env", "PLAY_TEST_KEY"],
        log_path=tmp_path / "server.log",
        env={"PLAY_TEST_KEY": "secret-key"},
    ) as srv:
        srv.wait_ready()
        # No key: every answer is HTTP 401 -> an invalid answer, asked again once, then the episode stops.
        stats = play_episode(env, ServerPolicy(srv.url), seed=0)
        assert stats.invalid_answers == 2 and stats.steps == 0
        assert "HTTP 401" in stats.error and "twice in a row" in stats.error
        assert play_episode(env, ServerPolicy(srv.url, api_key="secret-key"), seed=0).steps == 8
    with ServerProcess(["--model_path", str(tiny_model_dir)], log_path=tmp_path / "server2.log") as srv:
        srv.wait_ready()
        # The server dies before press 5: a one-line error naming the URL; the 4 presses stay recorded.
        with pytest.raises(PolicyError, match=rf"^{srv.url}/v1/predict: inference server unreachable"):
            play_episode(env, KillsServerAt(srv, 5), seed=0, runs_dir=tmp_path / "rec" / "runs")
    summary = convert_corpus(
        tmp_path / "rec",
        tmp_path / "data",
        min_frames=1,
        val_fraction=0,
        test_fraction=0,
        max_gap_seconds=0,
        progress=False,
    )
    assert summary["windows"]["produced"] == 4


def test_play_cli_side_by_side_report_gifs_and_recording(tiny_model_dir, tmp_path):
    out, runs = tmp_path / "play", tmp_path / "rec"
    r = subprocess.run(
        [
            sys.executable,
            PLAY,
            "--model_path",
            str(tiny_model_dir),
            "--policy",
            "model,expert,random",
            "--episodes",
            "2",
            "--max_steps",
            "40",
            "--gif",
            "1",
            "--output_dir",
            str(out),
            "--record_dir",
            str(runs),
            "--no_progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "play_report.json").read_text())
    assert list(report["policies"]) == ["model", "expert", "random"]
    expert = report["policies"]["expert"]
    assert expert["success_rate"] == 1.0 and expert["steps_ratio"] == 1.0
    model = report["policies"]["model"]
    assert model["episodes"] == 2 and model["steps"] > 0 and model["latency_ms_p50"] > 0
    assert sorted(report["gifs"]) == ["gifs/expert_e000.gif", "gifs/model_e000.gif", "gifs/random_e000.gif"]
    with Image.open(out / "gifs" / "model_e000.gif") as gif:
        assert gif.n_frames == report["episodes"]["model"][0]["steps"] + 1
    assert len(list((runs / "model" / "runs").glob("session_*"))) == 2
    assert "expert" in r.stdout and "1.000" in r.stdout
    assert (out / "play_report.png").stat().st_size > 0 and (out / "play_report.md").is_file()


def test_play_cli_usage_errors_are_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, PLAY, "--policy", "model", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: the model policy needs --model_path (a run, adapter, merged or MLX folder)"
    )
    r = subprocess.run(
        [sys.executable, PLAY, "--policy", "model,jump"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert r.returncode == 2 and "--policy: unknown jump" in r.stderr
