"""Production pipeline end to end on the tiny Gemma 3: the real merge, evaluate, MLX export, registry,
server and health-monitor CLIs. One flow (each step needs the previous one's folder):
gate failures stop before register -> the resumed run finishes, serves and promotes -> a re-run skips all."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pokemon_gemma.registry import Registry
from tests.conftest import REPO_ROOT
from tests.helpers import write_dataset

SCRIPT = str(REPO_ROOT / "scripts" / "production_pipeline.py")
REGISTRY = str(REPO_ROOT / "scripts" / "model_registry.py")
NAME = "pipe-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    from pokemon_gemma.modeling import apply_lora, load_model, load_processor

    root = tmp_path_factory.mktemp("pipeline")
    adapter = root / "run"
    apply_lora(load_model(str(tiny_model_dir)), r=2, alpha=4).save_pretrained(adapter)
    load_processor(str(tiny_model_dir)).save_pretrained(adapter)
    data = write_dataset(root / "data", 3, seed=1, name="test.jsonl")
    return {"root": root, "adapter": adapter, "data": data, "out": root / "out", "db": root / "registry.db"}


def pipeline(inputs, *extra, out=None):
    argv = [
        sys.executable,
        SCRIPT,
        "--checkpoint",
        str(inputs["adapter"]),
        "--eval_dataset",
        str(inputs["data"]),
        "--output_dir",
        str(out or inputs["out"]),
        "--registry_db",
        str(inputs["db"]),
        "--name",
        NAME,
        "--mlx_bits",
        "none",
        "--mlx_verify_samples",
        "2",
        "--export_eval_limit",
        "2",
        "--eval_batch_size",
        "2",
        *extra,
    ]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def state(inputs) -> dict:
    return json.loads((inputs["out"] / "pipeline_state.json").read_text())


def versions(inputs) -> list:
    with Registry(inputs["db"]) as reg:
        return reg.list_versions(NAME)


@pytest.mark.slow  # merges, exports, serves
def test_gate_fail_resume_serve_promote_and_rerun_skips(inputs, tiny_model_dir, tmp_path):
    # 1. Gate below --min_accuracy: merge and evaluate ran, nothing registered, non-zero exit, report written.
    first = pipeline(inputs, "--min_accuracy", "0.99")
    assert first.returncode == 1, first.stderr
    err = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is below --min_accuracy 0.9900" in err[0] and "Traceback" not in first.stderr
    st = state(inputs)
    accuracy = json.loads((inputs["out"] / "eval" / "merged" / "eval_report.json").read_text())["accuracy"]
    assert [st["stages"][s]["status"] for s in ("merge", "evaluate", "gate")] == ["done", "done", "failed"]
    assert st["stages"]["evaluate"]["outputs"]["accuracy"] == accuracy
    assert "register" not in st["stages"] and versions(inputs) == []
    merged_at = st["stages"]["merge"]["ended_at"]
    assert (inputs["out"] / "merged" / "merge_manifest.json").is_file()
    report = (inputs["out"] / "pipeline_report.md").read_text()
    assert "| 4 | gate | failed |" in report and "| 7 | register | not reached |" in report
    assert "| 3 | play | skipped |" in report  # no --min_play_success: no play stage

    # 2. A better production version exists: the gate stops again; that version stays untouched.
    better = tmp_path / "better_report.json"
    better.write_text(json.dumps({"accuracy": 1.0}))

    def reg(*a):
        return subprocess.run(
            [sys.executable, REGISTRY, "--registry_db", str(inputs["db"]), *a],
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert (
        reg("register", "--name", NAME, "--checkpoint", str(tiny_model_dir), "--metrics", str(better)).returncode == 0
    )
    assert reg("promote", NAME, "--version", "1", "--stage", "production").returncode == 0
    second = pipeline(inputs, "--min_accuracy", "0")
    assert second.returncode == 1
    assert f"is below production {NAME}:v1 (1.0000)" in second.stderr
    assert "merge: done earlier, skipped" in second.stdout and "evaluate: done earlier, skipped" in second.stdout
    assert [(v.version, v.stage) for v in versions(inputs)] == [(1, "production")]
    assert reg("promote", NAME, "--version", "1", "--stage", "archived").returncode == 0

    # 3. Resume: finished stages reused, the rest runs for real; served, healthy, promoted to production.
    port = free_port()
    third = pipeline(inputs, "--min_accuracy", "0", "--serve", "--port", str(port), "--monitor_checks", "2")
    assert third.returncode == 0, third.stderr + third.stdout
    st = state(inputs)
    assert st["stages"]["merge"]["ended_at"] == merged_at
    statuses = {k: v["status"] for k, v in st["stages"].items()}
    assert statuses == {**{k: "done" for k in statuses}, "play": "skipped"}, statuses
    mlx_report = json.loads((inputs["out"] / "eval" / "mlx" / "eval_report.json").read_text())
    mlx_acc = mlx_report["accuracy"]
    assert st["stages"]["evaluate_export"]["outputs"]["accuracy"] == mlx_acc
    merged_report = json.loads((inputs["out"] / "eval" / "merged" / "eval_report.json").read_text())
    # --export_eval_limit 2 of the 3 samples for the MLX export only; --eval_batch_size reaches evaluate.py.
    assert (merged_report["n"], mlx_report["n"], merged_report["batch_size"]) == (3, 2, 2)
    assert (inputs["out"] / "mlx" / "export_manifest.json").is_file()
    got = versions(inputs)
    assert [(v.version, v.stage) for v in got] == [(1, "archived"), (2, "production")]
    v2 = got[1]
    assert v2.path == str((inputs["out"] / "merged").resolve()) and v2.metrics["accuracy"] == accuracy
    assert v2.base_model == str(tiny_model_dir) and v2.tags["mlx_accuracy"] == f"{mlx_acc:.4f}"
    checks = [json.loads(line) for line in (inputs["out"] / "monitor.jsonl").read_text().splitlines()]
    assert len(checks) == 2
    pid = st["stages"]["serve"]["outputs"]["pid"]
    with pytest.raises(OSError):
        os.kill(pid, 0)  # the server this run started was stopped
    report = (inputs["out"] / "pipeline_report.md").read_text()
    assert f"| merged model | {accuracy:.4f} |" in report and f"| MLX export | {mlx_acc:.4f} |" in report
    assert f"{NAME}:v2" in report and "promoted to **production**" in report
    assert (inputs["out"] / "pipeline_accuracy.png").stat().st_size > 1000

    # 4. Re-run: every stage is skipped, nothing registered twice, state times unchanged.
    fourth = pipeline(inputs, "--min_accuracy", "0", "--serve", "--port", str(port), "--monitor_checks", "2")
    assert fourth.returncode == 0, fourth.stderr
    assert fourth.stdout.count("done earlier, skipped") == 9
    after = state(inputs)
    assert {k: v["ended_at"] for k, v in after["stages"].items()} == {k: v["ended_at"] for k, v in st["stages"].items()}
    reused = {k: v["skipped_on_rerun"] for k, v in after["stages"].items() if k != "play"}
    assert reused == {"merge": 3, "evaluate": 3, **{k: 1 for k in list(reused)[2:]}}
    assert len(versions(inputs)) == 2

    # 5. The folder belongs to these inputs: another dataset is a usage error, not a silent mix.
    other = write_dataset(tmp_path / "other", 2, name="test.jsonl")
    mixed = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--checkpoint",
            str(inputs["adapter"]),
            "--eval_dataset",
            str(other),
            "--output_dir",
            str(inputs["out"]),
            "--registry_db",
            str(inputs["db"]),
            "--name",
            NAME,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert mixed.returncode == 2 and "eval_dataset differ" in mixed.stderr


def test_play_gate_plays_the_merged_model_and_stops_below_min_play_success(inputs, tmp_path):
    out, db = tmp_path / "out", tmp_path / "play.db"
    first = pipeline(inputs, "--min_play_success", "0.99", "--play_episodes", "2", "--registry_db", str(db), out=out)
    assert first.returncode == 1, first.stderr
    err = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "gate: play success" in err[0] and "is below --min_play_success 0.9900" in err[0]
    st = json.loads((out / "pipeline_state.json").read_text())
    play = json.loads((out / "play" / "play_report.json").read_text())["policies"]["model"]
    assert play["episodes"] == 2 and st["stages"]["play"]["outputs"]["success_rate"] == play["success_rate"]
    assert st["stages"]["gate"]["status"] == "failed" and "register" not in st["stages"]
    # The same play figures pass a lower bar: the play stage is reused, the gate re-checked.
    second = pipeline(
        inputs,
        "--min_play_success",
        "0",
        "--play_episodes",
        "2",
        "--registry_db",
        str(db),
        "--skip_stages",
        "export_mlx,evaluate_export",
        out=out,
    )
    assert second.returncode == 0, second.stderr
    assert "play: done earlier, skipped" in second.stdout
    assert json.loads((out / "pipeline_state.json").read_text())["stages"]["gate"]["status"] == "done"
    assert "| play success (goals done, demo world) |" in (out / "pipeline_report.md").read_text()


def test_usage_errors_are_one_line(tmp_path):
    data = write_dataset(tmp_path / "d", 1, name="test.jsonl")
    out = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--checkpoint",
            str(tmp_path / "missing"),
            "--eval_dataset",
            str(data),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2
        and out.stderr.strip()
        == f"error: {tmp_path / 'missing'}: checkpoint folder not found (pass a trained run folder or merged model)"
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--checkpoint",
            str(tmp_path / "model"),
            "--eval_dataset",
            str(data),
            "--output_dir",
            str(tmp_path / "o"),
            "--skip_stages",
            "merge,exprot",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown stage(s) exprot" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # merges, evaluates, serves
def test_relative_paths_from_another_folder_and_a_killed_run_leaves_no_server(inputs, tmp_path):
    """Run from another folder with relative paths: every stage reads what the caller named (the registry
    beside the caller, not in the repository). Killed during monitor: the rerun stops the orphaned server,
    serves and monitors again, and leaves nothing running."""
    from pokemon_gemma.pipeline.stages import pid_alive

    work = tmp_path / "elsewhere"
    shutil.copytree(inputs["adapter"], work / "run")
    shutil.copytree(inputs["data"].parent, work / "data")  # the JSONL and the frames it names
    argv = [sys.executable, SCRIPT, "--checkpoint", "run", "--eval_dataset", "data/test.jsonl", "--output_dir", "out"]
    argv += ["--registry_db", "reg.db", "--name", NAME, "--skip_stages", "export_mlx,evaluate_export"]
    argv += ["--serve", "--port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    state_file = work / "out" / "pipeline_state.json"
    first = subprocess.Popen(
        [*argv, "--monitor_checks", "100000"], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            st = json.loads(state_file.read_text()) if state_file.is_file() else {"stages": {}}
            if st["stages"].get("monitor", {}).get("status") == "running":
                break
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(1)
        else:
            pytest.fail("the monitor stage never started")
        orphan = st["stages"]["serve"]["outputs"]["pid"]
    finally:
        first.kill()
        first.wait()
    assert pid_alive(orphan)  # the server outlived the killed pipeline
    second = subprocess.run(
        [*argv, "--monitor_checks", "1"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr
    assert f"stopped the server (pid {orphan}) a killed run left running" in second.stdout
    assert not pid_alive(orphan)
    st = json.loads(state_file.read_text())
    assert st["stages"]["monitor"]["status"] == "done"
    new = st["stages"]["serve"]["outputs"]["pid"]
    assert new != orphan and not pid_alive(new)  # this run's own server was stopped at the end
    assert (work / "reg.db").is_file() and not (REPO_ROOT / "reg.db").exists()
    with Registry(work / "reg.db") as reg:
        assert [v.stage for v in reg.list_versions(NAME)] == ["production"]
