"""The fast paths against their plain references, on the tiny Gemma 3 (nothing mocked):

- the training loss (sum over labelled tokens, logits only where needed, precomputed sdpa masks)
  against transformers' own `model(**batch).loss`;
- the 8-button scorer (one prompt pass, KV cache repeated 8 times) against 8 full forward passes;
- the server's `/v1/predict` (batched vision tower, frame cache) against the offline scorer;
- a seeded training run's first 4 losses, pinned, so a silent change in the loop shows.
"""

import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
import torch
from PIL import Image

from pokemon_gemma import loss as loss_module
from pokemon_gemma.collate import IGNORE_INDEX, Collator
from pokemon_gemma.dataset import BUTTONS, QUESTION, load_records, make_output
from pokemon_gemma.scoring import ButtonScorer, answer_prefix
from pokemon_gemma.serve.client import predict_payload, synthetic_frame, synthetic_stream
from pokemon_gemma.serve.launch import ServerProcess
from tests.conftest import REPO_ROOT
from tests.helpers import write_dataset


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_loss_sum_over_tokens_equals_transformers_loss_on_the_fast_mask_path(tiny_model_dir, processor, tmp_path):
    from pokemon_gemma.modeling import load_model

    model = load_model(str(tiny_model_dir)).eval()
    # A sliding window shorter than the samples: the sliding layers' masks differ from the full ones.
    model.config.get_text_config().sliding_window = 40
    records = load_records(write_dataset(tmp_path, 3, seed=5))
    # Answers and contexts of different lengths: the batch is padded, so padding must be masked too.
    records = [
        replace(r, output=make_output(r.button, "why " * (1 + 7 * i)), context=r.context + " Hurry." * (2 - i))
        for i, r in enumerate(records)
    ]
    batch = Collator(processor, 2048, "images")(records)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3 and int(lengths.min()) > 40

    fast_before = loss_module.MASK_PATHS["precomputed"]
    with torch.no_grad():
        total, n_tokens = loss_module.loss_sum(model, batch)
        reference = model(**batch).loss  # transformers: its own masks, full logits, mean over labels != -100
    assert loss_module.MASK_PATHS["precomputed"] == fast_before + 1, "the precomputed-mask path was not taken"
    assert n_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert float(total) / n_tokens == pytest.approx(float(reference), abs=1e-5)


def _reference_logprobs(model, processor, frames, prompt, causal_images=False) -> dict[str, float]:
    """log P(answer | prompt) for each of the 8 answers from one ordinary full forward pass each,
    inputs built by the Gemma 3 processor itself."""
    encode = lambda text: processor(  # noqa: E731
        text=[text], images=[frames], return_tensors="pt", add_special_tokens=False
    )
    n_prompt = encode(prompt)["input_ids"].shape[1]
    out = {}
    with torch.no_grad():
        for button in BUTTONS:
            enc = encode(prompt + answer_prefix(button))
            ids = enc["input_ids"][0]
            assert torch.equal(ids[:n_prompt], encode(prompt)["input_ids"][0])  # the answer starts at n_prompt
            if causal_images:
                enc.pop("token_type_ids")
            logprobs = torch.log_softmax(model(**enc).logits[0].float(), dim=-1)
            out[button] = sum(float(logprobs[i - 1, ids[i]]) for i in range(n_prompt, len(ids)))
    return out


@pytest.mark.parametrize("causal_images", [False, True], ids=["bidirectional_images", "causal_images"])
def test_scorer_equals_eight_full_forward_passes(tiny_model_dir, processor, causal_images):
    from pokemon_gemma.modeling import load_for_inference

    model, _ = load_for_inference(str(tiny_model_dir), device="cpu")
    collator = Collator(processor, 2048, "images")
    frames = [synthetic_frame(i) for i in range(3, 7)]
    context = "Goal: talk to the villager."
    scores = ButtonScorer(model, collator, causal_images=causal_images).score(frames, context, QUESTION)
    reference = _reference_logprobs(model, processor, frames, collator.prompt_text(context, QUESTION), causal_images)
    assert max(reference.values()) - min(reference.values()) > 1.0, "the 8 answers must score differently"
    for button in BUTTONS:
        assert scores.logprobs[button] == pytest.approx(reference[button], abs=1e-4), button


@pytest.mark.slow  # starts the server
def test_server_predict_equals_the_offline_scorer(tiny_model_dir, processor, tmp_path):
    from pokemon_gemma.modeling import load_for_inference

    model, _ = load_for_inference(str(tiny_model_dir), device="cpu")
    scorer = ButtonScorer(model, Collator(processor, 2048, "images"))
    stream = synthetic_stream(6, start=20)
    frames = [Image.open(io.BytesIO(base64.b64decode(f))).convert("RGB") for f in stream]
    context = "Goal: reach the door."
    with (
        ServerProcess(["--model_path", str(tiny_model_dir)], log_path=tmp_path / "server.log", cwd=tmp_path) as srv,
        httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as client,
    ):
        # one window without a session, then a sliding session whose later windows reuse cached frames
        requests = [(0, None), (0, "s"), (1, "s"), (2, "s")]
        bodies = []
        for start, session in requests:
            r = client.post(
                "/v1/predict", json=predict_payload(stream[start : start + 4], context=context, session_id=session)
            )
            assert r.status_code == 200, r.text
            bodies.append(r.json())
    assert [b["cache"]["frames_encoded"] for b in bodies] == [4, 4, 1, 1]  # the cached path was exercised
    for (start, _), body in zip(requests, bodies):
        offline = scorer.score(frames[start : start + 4], context, QUESTION)
        assert body["button"] == offline.button
        assert body["probabilities"] == pytest.approx(offline.probabilities, abs=1e-5)
    assert max(bodies[0]["probabilities"].values()) > 0.2  # not a uniform answer: the comparison can fail


# Measured on this tiny model (seed 0) with the command below; a change in the loop, the collator,
# the loss normalisation, the optimizer or the scheduler moves them.
PINNED_LOSSES = [8.077819, 6.900045, 5.914114, 5.328202]


@pytest.mark.slow  # trains
def test_seeded_run_first_four_losses_are_pinned(tiny_model_dir, tmp_path):
    train = write_dataset(tmp_path / "data", 8, seed=0)
    # Answers of very different lengths: how the loss is normalised over tokens shows in the numbers.
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["output"] = make_output(json.loads(row["output"])["button"], "why " * (1 + 5 * i))
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "scripts/sft_pokemon_gemma3.py",
        "--model_name",
        str(tiny_model_dir),
        "--dataset_path",
        str(train),
        "--eval_dataset_path",
        "",
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--batch_size",
        "2",
        "--grad_accum",
        "2",
        "--learning_rate",
        "3e-3",
        "--warmup_ratio",
        "0.0",
        "--lora_dropout",
        "0.1",
        "--logging_steps",
        "1",
        "--save_steps",
        "0",
        "--seed",
        "11",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    losses = [r["train/loss"] for r in rows]
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4)
