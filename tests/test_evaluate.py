"""Evaluation on the real tiny Gemma 3: metrics against a brute-force count, baselines, score vs
generate on a model trained to be confident, invalid answers counted, reports/PNGs, CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pokemon_gemma import evaluate as ev
from pokemon_gemma import plots
from pokemon_gemma.backends import load_backend
from pokemon_gemma.dataset import BUTTONS, QUESTION, Record, load_records, make_output
from tests.conftest import REPO_ROOT

# (button, frame colour, context text, metadata): the first 3 are the ones the confident model learns.
SAMPLES = [
    ("up", (255, 0, 0), {"scene_context": "battle"}),
    ("down", (0, 255, 0), {"context_detected": "navigation", "previous_buttons": ["a", "down"]}),
    ("left", (0, 0, 255), {"context": "battle", "previous_buttons": ["up"]}),
    ("a", (255, 255, 0), {"previous_buttons": ["a"]}),
    ("start", (0, 255, 255), {"context_detected": "menu", "previous_buttons": []}),
    ("right", (255, 0, 255), {"scene_context": "navigation", "context": "ignored", "previous_buttons": ["left"]}),
]
EXPECTED_CONTEXT = ["battle", "navigation", "battle", "unknown", "menu", "navigation"]


def write_dataset(folder: Path, samples=SAMPLES, name: str = "test.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (button, colour, md) in enumerate(samples):
        frames = []
        for k in range(4):
            img = Image.new("RGB", (240, 160), colour)
            img.paste((k * 60, 40, 200 - k * 40), (20 * k, 10, 20 * k + 30, 40))
            img.save(folder / f"s{i}_{k}.png")
            frames.append(f"s{i}_{k}.png")
        rows.append(
            {
                "frames": frames,
                "context": f"The player should press {button} now." + " Stay calm." * (i % 3),
                "question": QUESTION,
                "output": make_output(button),
                "metadata": {"session_id": "t", "turns": [i + 1], **md},
            }
        )
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def confident_model_dir(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """The tiny model fine-tuned (answer-only loss from the Collator labels) on the first 3 samples."""
    from pokemon_gemma.collate import Collator
    from pokemon_gemma.modeling import load_for_inference

    torch.manual_seed(0)
    model, processor = load_for_inference(str(tiny_model_dir), device="cpu")
    batch = Collator(processor, 2048, "images")(load_records(dataset)[:3])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05, f"the tiny model did not fit 3 samples (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("confident")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_eval(model_dir, dataset, out, **kw) -> dict:
    cfg = ev.EvalConfig(model_name=str(model_dir), dataset_path=str(dataset), output_dir=str(out), **kw)
    return ev.evaluate(cfg, progress=False)


@pytest.mark.slow  # trains the confident model
def test_accuracy_confusion_and_contexts_equal_brute_force(confident_model_dir, dataset, tmp_path):
    from pokemon_gemma.collate import Collator
    from pokemon_gemma.modeling import load_for_inference
    from pokemon_gemma.scoring import ButtonScorer

    report = run_eval(confident_model_dir, dataset, tmp_path / "eval")

    # Brute force: score each sample ourselves and count.
    model, processor = load_for_inference(str(confident_model_dir), device="cpu")
    scorer = ButtonScorer(model, Collator(processor, 2048, "images"))
    records = load_records(dataset)
    matrix = [[0] * 8 for _ in range(8)]
    correct, by_ctx, probs = 0, {}, []
    for record, ctx in zip(records, EXPECTED_CONTEXT):
        scores = scorer.score_record(record)
        matrix[BUTTONS.index(record.button)][BUTTONS.index(scores.button)] += 1
        correct += scores.button == record.button
        by_ctx.setdefault(ctx, []).append(scores.button == record.button)
        probs.append(scores.probabilities)
    predicted = {BUTTONS[j] for row in matrix for j, v in enumerate(row) if v}
    assert len(predicted) >= 3, "the check is weak if the model predicts a single button"

    assert report["n"] == 6 and report["mode"] == "score"
    assert report["accuracy"] == pytest.approx(correct / 6)
    assert report["confusion_matrix"]["matrix"] == matrix
    assert report["confusion_matrix"]["labels"] == list(BUTTONS)
    assert {k: (v["n"], v["correct"]) for k, v in report["accuracy_by_context"].items()} == {
        k: (len(v), sum(v)) for k, v in by_ctx.items()
    }
    for b in BUTTONS:
        assert report["mean_probability"][b] == pytest.approx(sum(p[b] for p in probs) / 6, abs=1e-5)
        tp, n_pred = matrix[BUTTONS.index(b)][BUTTONS.index(b)], sum(row[BUTTONS.index(b)] for row in matrix)
        support = sum(matrix[BUTTONS.index(b)])
        pb = report["per_button"][b]
        assert (pb["support"], pb["predicted"]) == (support, n_pred)
        assert pb["recall"] == (pytest.approx(tp / support) if support else None)
        assert pb["precision"] == (pytest.approx(tp / n_pred) if n_pred else None)
    f1s = [
        2 * matrix[i][i] / (sum(matrix[i]) + sum(r[i] for r in matrix))
        for i in range(8)
        if sum(matrix[i]) + sum(r[i] for r in matrix)
    ]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    lat = report["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] and lat["mean"] > 0
    assert report["model_kind"] == "base" and report["blank_frames"] is False
    assert report["dataset_path"] == str(dataset) and report["model_name"] == str(confident_model_dir)

    # Files: the JSON on disk is the report; PNGs decode; the Markdown embeds them.
    out = tmp_path / "eval"
    assert json.loads((out / "eval_report.json").read_text())["confusion_matrix"]["matrix"] == matrix
    for png in ("confusion_matrix.png", "accuracy_by_context.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    md = (out / "eval_report.md").read_text()
    assert "](confusion_matrix.png)" in md and "](accuracy_by_context.png)" in md
    assert f"**{report['accuracy']:.3f}**" in md and "repeat last button" in md
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["true"] for r in rows] == [r.button for r in records]


@pytest.mark.slow  # trains the confident model
def test_score_and_generate_agree_on_a_confident_model(confident_model_dir, dataset, tmp_path):
    scored = run_eval(confident_model_dir, dataset, tmp_path / "score", limit=3)
    generated = run_eval(confident_model_dir, dataset, tmp_path / "gen", limit=3, mode="generate", max_new_tokens=48)
    batched = run_eval(
        confident_model_dir, dataset, tmp_path / "gen2", limit=3, mode="generate", max_new_tokens=48, batch_size=2
    )  # a full batch and a partial one, padded on the left
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["predicted"] for r in read("score")] == [r["predicted"] for r in read("gen")] == ["up", "down", "left"]
    assert scored["accuracy"] == generated["accuracy"] == 1.0
    assert generated["json_valid_rate"] == 1.0 and generated["invalid_json"] == generated["invalid_button"] == 0
    assert min(scored["mean_probability"][b] for b in ("up", "down", "left")) > 0.25
    assert json.loads(read("gen")[0]["raw_output"])["button"] == "up"
    assert [r["raw_output"] for r in read("gen2")] == [r["raw_output"] for r in read("gen")]
    assert batched["json_valid_rate"] == 1.0 and batched["batch_size"] == 2


def test_batched_score_mode_equals_one_at_a_time(tiny_model_dir, dataset, tmp_path):
    """--batch_size 4 over 6 samples (a full batch and a partial one; contexts of 3 lengths, so the
    prompts are padded): the same predictions and probabilities (1e-5) as one sample per call."""
    one = run_eval(tiny_model_dir, dataset, tmp_path / "b1")
    four = run_eval(tiny_model_dir, dataset, tmp_path / "b4", batch_size=4)
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    rows1, rows4 = read("b1"), read("b4")
    assert [r["sample_id"] for r in rows1] == [r["sample_id"] for r in rows4] and len(rows4) == 6
    assert [r["predicted"] for r in rows1] == [r["predicted"] for r in rows4]
    for r1, r4 in zip(rows1, rows4):
        assert all(abs(r1["probabilities"][b] - r4["probabilities"][b]) <= 1e-5 for b in BUTTONS), r1["sample_id"]
    assert four["batch_size"] == 4 and four["accuracy"] == one["accuracy"]


def test_output_that_is_not_json_counts_as_invalid(tiny_model_dir, dataset, tmp_path):
    report = run_eval(tiny_model_dir, dataset, tmp_path / "gen", mode="generate", max_new_tokens=12)
    assert report["n"] == 6
    assert report["invalid_json"] == 6 and report["invalid_button"] == 0 and report["json_valid_rate"] == 0.0
    assert report["accuracy"] == 0.0
    cm = report["confusion_matrix"]
    assert cm["predicted_labels"][-1] == "invalid"
    assert [row[-1] for row in cm["matrix"]] == [1 if b in {s[0] for s in SAMPLES} else 0 for b in BUTTONS]
    assert (tmp_path / "gen" / "confusion_matrix.png").stat().st_size > 1000


def rec(button, previous=None):
    md = {"session_id": "x", "turns": [1]}
    if previous is not None:
        md["previous_buttons"] = previous
    return Record(frames=["f"] * 4, context="", question=QUESTION, output=make_output(button), metadata=md)


def test_baselines_on_a_crafted_set():
    records = [
        rec("up", ["down", "up"]),
        rec("up"),
        rec("down", ["down"]),
        rec("a", ["b"]),
        rec("a", ["A"]),
        rec("a", []),
    ]
    b = ev.compute_baselines(records)
    assert b["majority"] == {"button": "a", "source": "eval", "accuracy": pytest.approx(3 / 6)}
    assert b["repeat_last"]["accuracy"] == pytest.approx(3 / 6)  # up, down, A->a right; b wrong; 2 missing
    assert b["repeat_last"]["n_missing_previous"] == 2
    assert b["uniform_random"]["accuracy"] == 1 / 8
    train = [rec("down")] * 3 + [rec("up")] * 2
    b = ev.compute_baselines(records, train)
    assert b["majority"] == {"button": "down", "source": "train", "accuracy": pytest.approx(1 / 6)}
    assert ev.majority_button(["b", "a", "a", "b"]) == "a"  # ties break in BUTTONS order


def _probabilities(eval_dir: Path) -> list[dict[str, float]]:
    return [json.loads(x)["probabilities"] for x in (eval_dir / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow  # merges
def test_adapter_folder_and_merged_folder(tiny_model_dir, dataset, tmp_path):
    from pokemon_gemma.export import merge_lora
    from pokemon_gemma.modeling import apply_lora, load_model

    torch.manual_seed(0)
    peft_model = apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8)
    with torch.no_grad():  # lora_B starts at zero (adapter = base); give it weights that change the answers
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_lora(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged", dtype="fp32", verify=False)
    base = run_eval(tiny_model_dir, dataset, tmp_path / "base", limit=3)
    adapted = run_eval(tmp_path / "adapter", dataset, tmp_path / "adapted", limit=3)  # base read from the adapter
    merged = run_eval(tmp_path / "merged", dataset, tmp_path / "merged_eval", limit=3)
    assert (base["model_kind"], adapted["model_kind"], merged["model_kind"]) == ("base", "adapter", "merged")
    assert adapted["model_name"] == str(tmp_path / "adapter")
    assert (adapted["resolved_base_model"], adapted["resolved_adapter_path"]) == (
        str(tiny_model_dir),
        str(tmp_path / "adapter"),
    )
    base_p, adapted_p, merged_p = (_probabilities(tmp_path / d) for d in ("base", "adapted", "merged_eval"))
    assert len(base_p) == len(adapted_p) == len(merged_p) == 3
    # the adapter was loaded: it moves every sample's probabilities away from the base's
    for b_row, a_row in zip(base_p, adapted_p):
        assert max(abs(a_row[k] - b_row[k]) for k in BUTTONS) > 0.01
    # and the merged folder answers exactly like base + adapter
    for a_row, m_row in zip(adapted_p, merged_p):
        assert m_row == pytest.approx(a_row, abs=1e-5)


def cli(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow  # subprocesses load the model
def test_cli_blank_frames_train_majority_and_compare(tiny_model_dir, dataset, tmp_path):
    from pokemon_gemma.collate import Collator
    from pokemon_gemma.modeling import load_for_inference
    from pokemon_gemma.scoring import ButtonScorer

    train = write_dataset(tmp_path / "train", [("select", (0, 0, 0), {})] * 3 + [("up", (9, 9, 9), {})])
    out = tmp_path / "blank"
    proc = cli(
        "--model_name",
        tiny_model_dir,
        "--dataset_path",
        dataset,
        "--output_dir",
        out,
        "--limit",
        4,
        "--blank_frames",
        "--train_dataset_path",
        train,
        "--no_progress",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: {out / 'eval_report.md'}" in proc.stdout
    report = json.loads((out / "eval_report.json").read_text())
    assert report["n"] == 4 and report["blank_frames"] is True
    assert (
        report["baselines"]["majority"]["button"] == "select" and report["baselines"]["majority"]["source"] == "train"
    )
    # The CLI really scored black frames: same probabilities as scoring black images directly.
    model, processor = load_for_inference(str(tiny_model_dir), device="cpu")
    scorer = ButtonScorer(model, Collator(processor, 2048, "images"))
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for record, row in zip(load_records(dataset), rows):
        black = [Image.new("RGB", (240, 160)) for _ in range(4)]
        direct = scorer.score(black, record.context, record.question).probabilities
        assert row["probabilities"] == pytest.approx(direct, abs=1e-5)

    real = tmp_path / "real"
    assert run_eval(tiny_model_dir, dataset, real, limit=4)["accuracy"] is not None
    proc = cli("--compare", out, real)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and "accuracy" in lines[0] and "repeat_last" in lines[0]
    assert lines[2].startswith(str(out)) and lines[3].startswith(str(real))
    assert f"{report['accuracy']:.3f}" in lines[2] and "score+blank" in lines[2]

    proc = cli("--compare", out, tmp_path / "nowhere")
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "nowhere" in proc.stderr


@pytest.mark.slow  # 3 CLI subprocesses
def test_cli_missing_dataset_is_a_one_line_error(tmp_path):
    proc = cli("--model_name", "unused", "--dataset_path", tmp_path / "missing.jsonl", "--output_dir", tmp_path / "e")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jsonl'}: file not found"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"frames": []}\n')
    proc = cli("--model_name", "unused", "--dataset_path", bad, "--output_dir", tmp_path / "e")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {bad}:1: frames: expected 4 frames, got 0"
    assert not (tmp_path / "e" / "eval_report.json").exists()


def _pixels_of(pixels, colour: str):
    """(xs, ys) of the pixels of exactly this colour ('#rrggbb')."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    ys, xs = np.nonzero((pixels == rgb).all(axis=-1))
    return xs, ys


def test_plot_training_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train/loss": 2.0 / s, "lr": 1e-3 * s / 10} for s in range(1, 11)]
    rows[4].update({"eval/loss": 0.9, "eval/accuracy": 0.4})
    rows[9].update({"eval/loss": 0.5, "eval/accuracy": 0.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [sys.executable, "scripts/plot_training.py", "--run_dir", str(run)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(run / "training_curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
        pixels = np.asarray(im.convert("RGB"))
    third = pixels.shape[1] / 3
    # Each series is drawn in its own colour, in its panel, going the way the data goes (image y grows down).
    for colour, panel, trend in (
        ("#1f77b4", 0, "down"),  # train loss 2/step
        ("#ff7f0e", 0, "down"),  # val loss 0.9 -> 0.5
        ("#55a868", 1, "up"),  # val accuracy 0.4 -> 0.7
        ("#c44e52", 2, "up"),  # learning rate rising
    ):
        xs, ys = _pixels_of(pixels, colour)
        assert len(xs) > 50, colour
        assert panel * third <= xs.min() and xs.max() < (panel + 1) * third, colour
        first, last = ys[xs == xs.min()].mean(), ys[xs == xs.max()].mean()
        assert (first < last) if trend == "down" else (first > last), colour
    # Without eval rows there is no val loss or accuracy line.
    plots.training_curves_png([r for r in rows if "eval/loss" not in r], tmp_path / "no_eval.png")
    with Image.open(tmp_path / "no_eval.png") as im:
        no_eval = np.asarray(im.convert("RGB"))
    assert len(_pixels_of(no_eval, "#1f77b4")[0]) > 50
    assert len(_pixels_of(no_eval, "#ff7f0e")[0]) == len(_pixels_of(no_eval, "#55a868")[0]) == 0

    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n\n{not json\n")
    proc = subprocess.run(
        [sys.executable, "scripts/plot_training.py", "--run_dir", str(run)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {run / 'metrics.jsonl'}:3: invalid JSON")


@pytest.mark.slow  # trains and exports
def test_mlx_export_is_detected_and_evaluated(confident_model_dir, dataset, tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_vlm")
    from pokemon_gemma.export import export_mlx

    mlx_dir = tmp_path / "mlx"
    export_mlx(confident_model_dir, mlx_dir, quantization_bits=None, verify=False)
    report = run_eval(mlx_dir, dataset, tmp_path / "mlx_eval", limit=3)  # backend "auto": export_manifest.json
    assert report["model_kind"] == "mlx" and report["backend"] == "mlx"
    rows = [json.loads(x) for x in (tmp_path / "mlx_eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == ["up", "down", "left"] and report["accuracy"] == 1.0

    # --blank_frames reaches the MLX scorer too: the same scores as black frames given directly.
    backend = load_backend(str(mlx_dir))
    cfg = ev.EvalConfig(
        model_name=str(mlx_dir), dataset_path=str(dataset), output_dir=str(tmp_path / "b"), limit=2, blank_frames=True
    )
    ev.evaluate(cfg, backend=backend, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    for record, row in zip(load_records(dataset), rows):
        black = [Image.new("RGB", (240, 160)) for _ in range(4)]
        direct = backend.scorer.score(black, record.context, record.question).probabilities
        assert row["probabilities"] == pytest.approx(direct, abs=1e-5)
        real = backend.scorer.score_record(record).probabilities  # the scorer itself does not blank
        assert row["probabilities"] != pytest.approx(real, abs=1e-5)


def test_undecodable_frame_is_a_counted_skip(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", SAMPLES[:4])
    (tmp_path / "data" / "s1_2.png").write_bytes(b"not a png")
    report = run_eval(tiny_model_dir, data, tmp_path / "eval")
    assert (report["n"], report["n_skipped"]) == (3, 1)
    assert report["skipped"][0]["index"] == 1 and "s1_2.png" in report["skipped"][0]["reason"]
    # Baselines count the same 3 samples: up, left, a (the skipped "down" is not among them).
    assert report["baselines"]["majority"]["accuracy"] == pytest.approx(1 / 3)
    assert report["baselines"]["repeat_last"]["n_missing_previous"] == 1
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == 3
