"""Batch-size finder: real training-step probes on the tiny model (CPU, one child process per probe)."""

import importlib.util
import json
from types import SimpleNamespace

import pytest

from pokemon_gemma.batch_finder import ProbeResult, probe_in_child, search, update_env_file
from pokemon_gemma.config import Settings
from pokemon_gemma.dataset import load_records
from tests.conftest import REPO_ROOT
from tests.helpers import write_dataset

# A longer context makes each extra sample cost tens of MB, well above the RSS noise (~2 MB).
LONG_CONTEXT = "Goal: reach the door. " + " ".join(f"step {i} went up then left" for i in range(30))
ENV_TEXT = (
    "# settings for the run\n"
    "export MODEL_NAME=google/gemma-3-4b-it   # the base\n"
    "BATCH_SIZE=1\n"
    "\n"
    "# accumulate micro-batches\n"
    "LEARNING_RATE=0.0002\r\n"
    "HUGGINGFACE_TOKEN=hf_keep_me_exactly\n"
    "WANDB_PROJECT=pokemon"
)  # no final newline: appended keys must start on their own line


def _load_script():
    spec = importlib.util.spec_from_file_location("find_batch_size", REPO_ROOT / "scripts" / "find_batch_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture
def run_script(capsys):
    """The CLI in this process (probes still run in their own processes): exit code, stdout, stderr."""

    def run(*args):
        if "--env_file" not in args:  # never the checkout's own .env
            args = (*args, "--env_file", "/nonexistent/.env", "--output", "/nonexistent/bs.json")
        code = script.main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("bf_data"), 6, context=LONG_CONTEXT)


def test_search_doubles_then_bisects_to_the_largest_fit():
    probed = []

    def probe(b):
        probed.append(b)
        return ProbeResult(b, fits=b <= 13, peak_memory_gb=0.1 * b if b <= 13 else None)

    results = search(probe, max_batch_size=64, limit_gb=None)
    assert probed == [1, 2, 4, 8, 16, 12, 14, 13]
    assert max(r.batch_size for r in results if r.fits) == 13
    # A peak above the limit is a failure even without an OOM.
    probed.clear()
    results = search(probe, max_batch_size=64, limit_gb=0.55)
    assert probed == [1, 2, 4, 8, 6, 5] and [r.batch_size for r in results if r.fits] == [1, 2, 4, 5]


@pytest.mark.slow  # probes train in child processes
def test_budget_between_two_measured_peaks_picks_the_larger_size_under_it(
    tiny_model_dir, long_dataset, tmp_path, run_script
):
    s = Settings(model_name=str(tiny_model_dir), dataset_path=str(long_dataset), max_seq_length=4096)
    records = load_records(long_dataset)
    p2 = probe_in_child(s, records, 2, 2)
    p3 = probe_in_child(s, records, 3, 2)
    assert p2.fits and p3.fits and p3.peak_memory_gb - p2.peak_memory_gb > 0.01, (p2, p3)
    limit = (p2.peak_memory_gb + p3.peak_memory_gb) / 2
    budget = limit / 0.9  # default --safety_margin 0.9: a size fits when its peak <= 90% of the budget

    env_file = tmp_path / "demo.env"
    env_file.write_bytes(ENV_TEXT.encode())
    out = tmp_path / "bs.json"
    proc = run_script(
        "--dataset_path",
        long_dataset,
        "--model_name",
        tiny_model_dir,
        "--max_seq_length",
        4096,
        "--max_batch_size",
        4,
        "--probe_steps",
        2,
        "--max_memory_gb",
        budget,
        "--target_effective_batch",
        16,
        "--output",
        out,
        "--env_file",
        env_file,
        "--update_env",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    fits = {r["batch_size"]: r["fits"] for r in report["results"]}
    assert fits == {1: True, 2: True, 4: False, 3: False}  # doubling to 4, then bisection tried 3
    assert report["recommendation"]["batch_size"] == 2
    assert report["recommendation"]["grad_accum"] == 8  # ceil(16 / (2 x 1))
    peaks = {r["batch_size"]: r["peak_memory_gb"] for r in report["results"]}
    assert peaks[2] <= limit < peaks[3] and peaks[1] < peaks[2] < peaks[3] < peaks[4]
    assert "BATCH_SIZE=2 GRAD_ACCUM=8" in proc.stdout
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    new = env_file.read_bytes().decode()
    assert new == ENV_TEXT.replace("BATCH_SIZE=1", "BATCH_SIZE=2") + "\nGRAD_ACCUM=8\n"


def test_update_env_keeps_every_other_byte(tmp_path):
    env_file = tmp_path / ".env"
    text = "# c\nexport BATCH_SIZE = 4  \nGRAD_ACCUM=2\r\nX=1\n\n# end\n"
    env_file.write_bytes(text.encode())
    env_file.chmod(0o640)
    update_env_file(env_file, {"BATCH_SIZE": 8, "GRAD_ACCUM": 3})
    assert env_file.read_bytes() == b"# c\nexport BATCH_SIZE=8\nGRAD_ACCUM=3\r\nX=1\n\n# end\n"
    assert env_file.stat().st_mode & 0o777 == 0o640
    missing = tmp_path / "new.env"
    update_env_file(missing, {"BATCH_SIZE": 1, "GRAD_ACCUM": 16})
    assert missing.read_text() == "BATCH_SIZE=1\nGRAD_ACCUM=16\n"


@pytest.mark.slow  # probes train in child processes
def test_batch_1_not_fitting_says_what_to_change(tiny_model_dir, tmp_path, run_script):
    data = write_dataset(tmp_path / "d", 2)
    env_file = tmp_path / "x.env"
    env_file.write_text("BATCH_SIZE=5\n")
    out = tmp_path / "bs.json"
    proc = run_script(
        "--dataset_path",
        data,
        "--model_name",
        tiny_model_dir,
        "--max_batch_size",
        4,
        "--probe_steps",
        2,
        "--max_memory_gb",
        0.05,
        "--output",
        out,
        "--env_file",
        env_file,
        "--update_env",
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: even batch size 1 does not fit")
    for advice in ("--use_qlora", "--gradient_checkpointing", "--max_seq_length", "--frame_layout grid"):
        assert advice in err
    report = json.loads(out.read_text())
    assert report["recommendation"] is None and [r["batch_size"] for r in report["results"]] == [1]
    assert env_file.read_text() == "BATCH_SIZE=5\n"  # nothing to recommend: .env untouched


def test_missing_empty_dataset_and_unloadable_model_are_one_line_errors(tiny_model_dir, tmp_path, run_script):
    proc = run_script("--dataset_path", tmp_path / "nope.jsonl", "--model_name", tiny_model_dir)
    assert (
        proc.returncode == 1
        and proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.jsonl'}: file not found"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = run_script("--dataset_path", empty, "--model_name", tiny_model_dir)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"error: {empty}: no records"
    data = write_dataset(tmp_path / "d", 1)
    proc = run_script("--dataset_path", data, "--model_name", tmp_path / "no_model")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: cannot load") and "no_model" in last
    assert "Traceback" not in proc.stderr
