"""validate_training.py on real files and the real tiny processor: a good dataset passes, each kind of
problem is named and fails the run, and a token in the environment never reaches the output."""

import importlib.util
import json

import pytest

from pokemon_gemma.dataset import make_output
from tests.conftest import REPO_ROOT
from tests.helpers import write_dataset

SECRET = "hf_VALIDATE_SECRET_0123456789"


def _load_script():
    spec = importlib.util.spec_from_file_location("validate_training", REPO_ROOT / "scripts" / "validate_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


def good_dataset(folder):
    """train (12 samples, sessions s0-s2) + val (4 samples, session v0) with distinct frames."""
    train = write_dataset(folder, 12, seed=0, sessions=3)
    val = write_dataset(folder, 4, seed=1, name="val.jsonl", sessions=1)
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    for row in rows:
        row["metadata"]["session_id"] = "v0"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, val


def run(capsys, tmp_path, *args):
    out = tmp_path / "report.json"
    code = script.main(
        [
            *map(str, args),
            "--env_file",
            str(tmp_path / "none.env"),
            "--output",
            str(out),
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err, json.loads(out.read_text())


def edit_lines(path, fn):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in fn(rows)))


def test_good_dataset_passes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    train, _ = good_dataset(tmp_path / "data")
    code, out, err, report = run(capsys, tmp_path, "--dataset_path", train, "--model_name", tiny_model_dir)
    assert code == 0, err
    assert report["ok"] and report["errors"] == 0
    assert report["splits"]["train"]["valid_records"] == 12 and report["splits"]["val"]["valid_records"] == 4
    tokens = report["tokens"]
    assert tokens["image_tokens_per_sample"] == 4 * 16 and tokens["rejected"] == 0
    assert 4 * 16 < tokens["p95"] <= tokens["max"] <= 2048
    assert report["sessions"]["overlaps"] == {} and report["frames"] == {
        "distinct": 64,
        "bad": 0,
        "sizes": {"240x160": 64},
    }
    assert sum(report["label_distribution"]["train"].values()) == 12
    assert report["environment"]["hub_token"] == "not set" and not report["environment"]["gated_model"]
    assert "OK: 0 error(s)" in out
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    # --frame_layout grid: one image per sample, a quarter of the image tokens.
    code, _, _, grid = run(
        capsys, tmp_path, "--dataset_path", train, "--model_name", tiny_model_dir, "--frame_layout", "grid"
    )
    assert code == 0 and grid["tokens"]["image_tokens_per_sample"] == 16


def test_gemma4_token_budget_follows_its_image_budget(tiny_gemma4_dir, tmp_path, capsys):
    """Gemma 4's soft tokens per frame come from --image_tokens (60 at budget 70, 126 at 140 for a
    240x160 frame): the budget check counts what that family's processor makes."""
    train, _ = good_dataset(tmp_path / "data")
    budgets = {}
    for budget in (70, 140):
        code, _, err, report = run(
            capsys, tmp_path, "--dataset_path", train, "--model_name", tiny_gemma4_dir, "--image_tokens", budget
        )
        assert code == 0, err
        budgets[budget] = report["tokens"]["image_tokens_per_sample"]
        assert budgets[budget] < report["tokens"]["p95"] <= report["tokens"]["max"] <= 2048
    assert budgets == {70: 4 * 60, 140: 4 * 126}


def _missing_frame(train, val):
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    (train.parent / rows[4]["frames"][2]).unlink()
    return ["frame not found", rows[4]["frames"][2], f"{train}:5"]


def _corrupt_frame(train, val):
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    (train.parent / rows[8]["frames"][0]).write_bytes(b"\x89PNG truncated")
    return ["frame does not decode", rows[8]["frames"][0], f"{train}:9"]


def _decompression_bomb(train, val):
    from tests.helpers import bomb_png

    rows = [json.loads(line) for line in train.read_text().splitlines()]
    bomb_png(train.parent / rows[5]["frames"][1])  # 109 KB declaring 30000x30000: never decoded
    return ["frame too large", rows[5]["frames"][1], "30000x30000", f"{train}:6"]


def _three_frames(train, val):
    edit_lines(train, lambda rows: [{**r, "frames": r["frames"][:3]} if i == 1 else r for i, r in enumerate(rows)])
    return [f"{train}:2: frames: expected 4 frames, got 3"]


def _invalid_button(train, val):
    edit_lines(
        train,
        lambda rows: [{**r, "output": json.dumps({"button": "jump"})} if i == 2 else r for i, r in enumerate(rows)],
    )
    return [f"{train}:3: output: output has no valid button (got 'jump')"]


def _over_long(train, val):
    long_answer = make_output("up", "walk up " * 1000, "navigation", "overworld")
    edit_lines(train, lambda rows: [{**r, "output": long_answer} if i == 6 else r for i, r in enumerate(rows)])
    return [f"{train}:7: s0:6,7,8,9:", "exceed --max_seq_length 1024 even without context"]


def _session_overlap(train, val):
    edit_lines(
        val,
        lambda rows: [
            {**r, "metadata": {**r["metadata"], "session_id": "s1"}} if i == 0 else r for i, r in enumerate(rows)
        ],
    )
    return ["train/val: 1 session(s) in both splits: s1"]


def _duplicate_window(train, val):
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines) + lines[3])
    return [f"{train}:13: duplicate window", f"as {train}:4"]


def _bad_json(train, val):
    lines = train.read_text().splitlines(keepends=True)
    lines.insert(2, '{"frames": [\n')
    train.write_text("".join(lines))
    return [f"{train}:3: invalid JSON"]


@pytest.mark.parametrize(
    "make_problem",
    [
        _missing_frame,
        _corrupt_frame,
        _decompression_bomb,
        _three_frames,
        _invalid_button,
        _over_long,
        _session_overlap,
        _duplicate_window,
        _bad_json,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_each_problem_is_named_and_fails(make_problem, tiny_model_dir, tmp_path, capsys):
    train, val = good_dataset(tmp_path / "data")
    expected = make_problem(train, val)
    code, out, err, report = run(
        capsys, tmp_path, "--dataset_path", train, "--model_name", tiny_model_dir, "--max_seq_length", 1024
    )
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err  # exactly this problem, nothing else
    for text in expected:
        assert text in error_lines[0]
    assert report["ok"] is False and report["errors"] == 1
    assert "FAILED: 1 error(s)" in out and "Traceback" not in err


def test_token_never_printed_or_saved(tiny_model_dir, tmp_path, capsys, monkeypatch):
    train, _ = good_dataset(tmp_path / "data")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    code, _, err, report = run(capsys, tmp_path, "--dataset_path", train, "--model_name", "google/gemma-3-4b-it")
    assert code == 1 and "google/gemma-3-4b-it: gated model id and no HUGGINGFACE_TOKEN" in err
    assert report["environment"]["hub_token"] == "not set"

    monkeypatch.setenv("HUGGINGFACE_TOKEN", SECRET)
    for model in ("google/gemma-3-4b-it", tiny_model_dir):  # offline: the gated id fails to load, with the token
        code, out, err, report = run(capsys, tmp_path, "--dataset_path", train, "--model_name", model)
        text = (tmp_path / "report.json").read_text()
        assert SECRET not in out and SECRET not in err and SECRET not in text
        assert report["environment"]["hub_token"] == "set"
    assert code == 0  # the tiny model: a token is harmless
