"""The training loop on the tiny model (CPU, real peft/accelerate): exact labels, length policy,
token-normalised gradients, kill-and-resume, multi-process, SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pokemon_gemma.artifacts import model_type
from pokemon_gemma.collate import IGNORE_INDEX, Collator, SampleError
from pokemon_gemma.dataset import QUESTION, Record, load_records, make_output
from tests.conftest import REPO_ROOT
from tests.helpers import run_tree, write_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_data")
    return write_dataset(folder, 24, seed=0), write_dataset(folder, 8, seed=1, name="val.jsonl")


@pytest.fixture(params=["gemma3", "gemma4"])
def family_model_dir(request):
    """The tiny model of each family (tests that must hold for every family take this)."""
    return request.getfixturevalue({"gemma3": "tiny_model_dir", "gemma4": "tiny_gemma4_dir"}[request.param])


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def train_cmd(model, train, val, out, *extra):
    return [
        sys.executable,
        "scripts/sft_pokemon_gemma3.py",
        "--model_name",
        str(model),
        "--dataset_path",
        str(train),
        "--eval_dataset_path",
        str(val),
        "--output_dir",
        str(out),
        "--batch_size",
        "2",
        "--grad_accum",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--eval_steps",
        "0",
        "--seed",
        "7",
        *extra,
    ]


def test_labels_are_exactly_the_answer_and_end_of_turn(processor, data):
    record = load_records(data[0])[0]
    sample = Collator(processor).encode(record)
    labelled = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == record.output + "<end_of_turn>"
    # everything before the answer (prompt, images) is masked; exactly one <bos>
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    assert (sample.labels[:first] == IGNORE_INDEX).all()
    assert int((sample.input_ids == processor.tokenizer.bos_token_id).sum()) == 1
    assert int(sample.token_type_ids.sum()) == 4 * processor.image_seq_length


def test_overlong_sample_is_shortened_then_rejected_never_zero_labels(processor, data):
    base = load_records(data[0])[0]
    long = Record(
        base.frames,
        "Goal: reach the door. " + "very long context " * 200,
        QUESTION,
        base.output,
        {"session_id": "long", "turns": [1, 2, 3, 4]},
    )
    full_length = Collator(processor).sample_length(long)
    limit = full_length - 300
    sample = Collator(processor, max_seq_length=limit).encode(long)
    assert sample.context_shortened and sample.length <= limit
    assert processor.tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX]) == long.output + "<end_of_turn>"
    assert int(sample.token_type_ids.sum()) == 4 * processor.image_seq_length  # images intact
    with pytest.raises(SampleError, match="long:1,2,3,4"):
        Collator(processor, max_seq_length=4 * processor.image_seq_length).encode(long)


@pytest.mark.slow  # runs the training CLI
def test_training_rejects_overlong_samples_by_id(tiny_model_dir, tmp_path, processor):
    train = write_dataset(tmp_path, 8, seed=2)
    proc = subprocess.run(
        train_cmd(tiny_model_dir, train, "", tmp_path / "run", "--max_steps", "1", "--max_seq_length", "40"),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "rejected train sample: s0:0,1,2,3" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train: no sample fits --max_seq_length 40")
    assert "Traceback" not in proc.stderr


def _grads(tiny_model_dir, dataset, batch, accum, out, processes=1):
    probe = [
        str(REPO_ROOT / "tests/grad_probe.py"),
        str(tiny_model_dir),
        str(dataset),
        str(batch),
        str(accum),
        str(out),
    ]
    if processes == 1:
        cmd = [sys.executable, *probe]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/cpu.yaml",
            "--num_processes",
            str(processes),
            *probe,
        ]
    proc = run_tree(cmd, REPO_ROOT, ENV, timeout=300)  # a 2-process launch: killed as a tree on a timeout
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(out)


@pytest.mark.slow  # 3 training subprocesses
def test_gradients_equal_for_batch_accum_and_process_splits(family_model_dir, tmp_path):
    tiny_model_dir = family_model_dir
    # Answers of different lengths make per-micro-batch averaging visibly wrong.
    dataset = write_dataset(tmp_path, 4, seed=5)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["output"] = make_output(json.loads(row["output"])["button"], "why " * (1 + 6 * i))
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    g_41 = _grads(tiny_model_dir, dataset, 4, 1, tmp_path / "g41.pt")
    g_14 = _grads(tiny_model_dir, dataset, 1, 4, tmp_path / "g14.pt")
    g_2x2 = _grads(tiny_model_dir, dataset, 2, 1, tmp_path / "g2x2.pt", processes=2)
    assert g_41.keys() == g_14.keys() == g_2x2.keys() and len(g_41) > 0
    scale = max(float(g.abs().max()) for g in g_41.values())
    assert scale > 0
    # Gemma 4 has more norms computed in float32 whatever the model dtype (q/k/v norms in both towers):
    # the same split differs by float rounding only, measured 1.2e-5 here (a duplicated sample in a batch
    # of 2 vs alone: 2.9e-7 of the full model's gradient scale with the weights in float64, norms still float32).
    tolerance = {"gemma3": 1e-5, "gemma4": 3e-5}[model_type(tiny_model_dir)]
    for other in (g_14, g_2x2):
        worst = max(float((g_41[k] - other[k]).abs().max()) for k in g_41)
        assert worst / scale <= tolerance, worst / scale


def _adapter(path):
    return load_file(path / "adapter_model.safetensors")


def _kill_after_checkpoint(cmd, out, checkpoint="checkpoint-2"):
    """Start a training run and SIGKILL it as soon as `checkpoint` is complete."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / checkpoint / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # trains (3 runs)
def test_sigkill_then_resume_ends_with_identical_adapter(family_model_dir, data, tmp_path):
    tiny_model_dir = family_model_dir
    train, val = data
    extra = ["--max_steps", "8", "--save_steps", "2", "--lora_dropout", "0.1", "--batch_size", "3"]
    ref = subprocess.run(
        train_cmd(tiny_model_dir, train, val, tmp_path / "ref", *extra),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    _kill_after_checkpoint(train_cmd(tiny_model_dir, train, val, out, *extra), out)
    assert not (out / "adapter_model.safetensors").exists(), "run finished before it was killed"

    resumed = subprocess.run(
        train_cmd(tiny_model_dir, train, val, out, *extra, "--resume_from_checkpoint", "latest"),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a, b = _adapter(tmp_path / "ref"), _adapter(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow  # trains
def test_sigterm_saves_checkpoint_and_exits_zero(tiny_model_dir, data, tmp_path):
    train, val = data
    out = tmp_path / "term"
    proc = subprocess.Popen(
        train_cmd(tiny_model_dir, train, val, out, "--max_steps", "400", "--save_steps", "0"),
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert int(checkpoints[0].name.split("-")[1]) < 400


@pytest.mark.slow  # trains (3 runs)
def test_full_fine_tuning_killed_then_resumed_ends_with_identical_weights(tiny_model_dir, data, tmp_path):
    train, _ = data
    extra = ["--no_peft", "--max_steps", "6", "--save_steps", "2", "--batch_size", "3"]
    ref = subprocess.run(
        train_cmd(tiny_model_dir, train, "", tmp_path / "ref", *extra),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    _kill_after_checkpoint(train_cmd(tiny_model_dir, train, "", out, *extra), out)
    assert not (out / "model.safetensors").exists(), "run finished before it was killed"
    resumed = subprocess.run(
        train_cmd(tiny_model_dir, train, "", out, *extra, "--resume_from_checkpoint", "latest"),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() == initial.keys()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # full fine-tuning changed the weights
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


@pytest.mark.slow  # runs the training CLI
def test_full_checkpoint_with_a_renamed_or_missing_tensor_is_a_one_line_error(tiny_model_dir, data, tmp_path):
    from safetensors.torch import save_file

    from pokemon_gemma.checkpoint import CheckpointError, load_full_weights
    from pokemon_gemma.modeling import load_model

    # A complete full-model checkpoint: the tiny model's own weights (lm_head is tied, so absent).
    good = tmp_path / "good"
    load_model(str(tiny_model_dir)).save_pretrained(good)
    tensors = load_file(good / "model.safetensors")
    name = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    model = load_model(str(tiny_model_dir))
    load_full_weights(model, good)  # strict, and the tied lm_head may be absent

    missing = tmp_path / "missing"
    missing.mkdir()
    save_file({k: v for k, v in tensors.items() if k != name}, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"1 missing, e\.g\. \['{re.escape(name)}'\]; 0 unexpected"):
        load_full_weights(model, missing)

    # Through the CLI: a real checkpoint with one tensor renamed stops the resume with one line.
    train, _ = data
    out = tmp_path / "run"
    extra = ["--no_peft", "--max_steps", "2", "--save_steps", "2", "--batch_size", "3", "--grad_accum", "1"]
    first = subprocess.run(
        train_cmd(tiny_model_dir, train, "", out, *extra), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = out / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    saved[name.replace("q_proj", "query_proj")] = saved.pop(name)
    save_file(saved, checkpoint / "model.safetensors", metadata={"format": "pt"})
    extra[extra.index("--max_steps") + 1] = "4"
    proc = subprocess.run(
        train_cmd(tiny_model_dir, train, "", out, *extra, "--resume_from_checkpoint", str(checkpoint)),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {checkpoint}: weights do not match the model (1 missing, e.g. ['{name}']; ")
    assert last.endswith(f"1 unexpected, e.g. ['{name.replace('q_proj', 'query_proj')}'])")


@pytest.mark.slow  # trains in 3 processes
def test_two_process_run_ends_with_the_one_process_adapter(tiny_model_dir, data, tmp_path):
    """2 processes x batch 1 see the same samples per micro-batch as 1 process x batch 2, and the loss
    is normalised over the whole step: with dropout 0 both runs must end with the same adapter."""
    train, val = data
    common = ["--max_steps", "3", "--eval_steps", "3", "--save_steps", "3", "--lora_dropout", "0"]
    one = subprocess.run(
        train_cmd(tiny_model_dir, train, val, tmp_path / "one", *common, "--batch_size", "2"),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/cpu.yaml",
        "--num_processes",
        "2",
        *train_cmd(tiny_model_dir, train, val, out, *common, "--batch_size", "1")[1:],
    ]
    proc = run_tree(cmd, REPO_ROOT, ENV, timeout=600)  # killed as a tree on a timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert (out / "checkpoint-3" / "rng_state_1.pth").is_file()  # each process's RNG is saved

    a, b = _adapter(tmp_path / "one"), _adapter(out)
    assert a.keys() == b.keys() and len(a) > 0
    # lora_B starts at zero, so its norm is what 3 steps trained. AdamW turns a float-rounding
    # difference in a near-zero gradient into a visible step for that one element, so the runs are
    # compared by norm: measured 3e-5 of the trained norm (one element of 98k); with the gradients
    # not synchronised between the processes it is 0.3.
    trained = sum(float((a[k] ** 2).sum()) for k in a if "lora_B" in k) ** 0.5
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    assert trained > 0.1 and diff <= 1e-3 * trained, (diff, trained)
    assert _adapter(out / "best").keys() == a.keys()

    rows_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [1, 2, 3] and "eval/accuracy" in rows_two[-1]
    assert [r["train/loss"] for r in rows_two] == pytest.approx([r["train/loss"] for r in rows_one], rel=1e-5)
    assert rows_two[-1]["eval/loss"] == pytest.approx(rows_one[-1]["eval/loss"], rel=1e-5)


def test_collator_matches_gemma3_processor(processor, data):
    """The collator skips the processor call for speed; its tensors must be the processor's own."""
    collator = Collator(processor)
    record = load_records(data[0])[1]
    sample = collator.encode(record)
    text = collator.prompt_text(record.context, record.question) + record.output + "<end_of_turn>\n"
    images = [collator.frames.load(p) for p in record.frames]
    ref = processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(sample.input_ids, ref["input_ids"][0])
    assert torch.equal(sample.token_type_ids, ref["token_type_ids"][0])
    assert torch.equal(sample.pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_decompression_bomb_frame_is_a_one_line_error_naming_the_file(tiny_model_dir, tmp_path, workers):
    """A frame whose header declares 30000x30000 pixels (a 109 KB PNG) stops training with one line
    naming the file, whether it is loaded inline or in a DataLoader worker; it is never decoded."""
    from tests.helpers import bomb_png

    train = write_dataset(tmp_path, 4, seed=3)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    bomb = bomb_png(tmp_path / rows[0]["frames"][3])
    cmd = train_cmd(tiny_model_dir, train, "", tmp_path / "run", "--max_steps", "2", "--dataloader_workers", workers)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {bomb}: frame declares 30000x30000 pixels"), line
