"""Batched scoring on the real tiny Gemma 3 (fp32): `score_batch` gives the probabilities that
scoring each sample alone gives, and both equal a plain full-sequence forward pass per answer
(no KV cache, no padding, the model's own attention masks), for mixed prompt lengths, samples with
and without precomputed vision features, a sliding window shorter than the prompt, causal images and
the 2x2 grid layout."""

import json
import os
import shutil

import pytest
import torch

from pokemon_gemma.collate import Collator
from pokemon_gemma.dataset import BUTTONS, QUESTION
from pokemon_gemma.modeling import load_for_inference
from pokemon_gemma.scoring import ButtonScorer, ScoreItem, answer_prefix
from pokemon_gemma.serve.client import synthetic_frame

TOLERANCE = 1e-5
CONTEXTS = [
    "",
    "Goal: reach the door.",
    "Goal: talk to the villager by the pond. " * 8,  # ~150 tokens longer than the shortest prompt
    "x",
    "Goal: reach the door. The path north is blocked by trees.",
]


@pytest.fixture(scope="module")
def short_window_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 24-token sliding window: every prompt (170-330 tokens) is longer, so the
    window cuts through images and text on 5 of its 6 layers."""
    out = tmp_path_factory.mktemp("short_window")
    for name in os.listdir(tiny_model_dir):
        shutil.copy(tiny_model_dir / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["sliding_window"] = 24
    (out / "config.json").write_text(json.dumps(config))
    return out


def items_for(scorer: ButtonScorer, n: int = 6) -> list[ScoreItem]:
    items = [
        ScoreItem([synthetic_frame(3 * i + k) for k in range(4)], CONTEXTS[i % len(CONTEXTS)], QUESTION)
        for i in range(n)
    ]
    if scorer.collator.frame_layout == "images":  # as the server passes them: cached vision features
        for item in items[1::2]:
            item.features = scorer.image_features(item.frames)
    return items


def reference_logprobs(scorer: ButtonScorer, item: ScoreItem) -> dict[str, float]:
    """Each answer scored by one full forward pass over prompt + answer: the plainest way there is."""
    collator, model = scorer.collator, scorer.model
    prompt = collator.prompt_text(item.context, item.question)
    full = [collator.expanded_ids(prompt + answer_prefix(b)) for b in BUTTONS]
    # Scored from the first answer token: where the prompt's own ids stop matching (log P(answer | prompt)).
    start = len(os.path.commonprefix([collator.expanded_ids(prompt), full[0]]))
    pixel_values = collator.pixel_values(collator.images_for([], item.frames))
    out = {}
    for b, ids in zip(BUTTONS, full):
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                token_type_ids=None if scorer.causal_images else (input_ids == collator.image_token_id).long(),
            ).logits[0]
        logprobs = torch.log_softmax(logits.double(), -1)
        out[b] = float(sum(logprobs[j - 1, ids[j]] for j in range(start, len(ids))))
    return out


def assert_close(got: dict[str, float], want: dict[str, float], what: str) -> None:
    worst = max(abs(got[b] - want[b]) for b in BUTTONS)
    assert worst <= TOLERANCE, f"{what}: differs by {worst:.2e}"


@pytest.mark.parametrize("variant", ["images", "short_window", "causal_images", "grid"], ids=lambda v: f"variant={v}")
def test_batched_scores_equal_one_at_a_time_and_a_full_forward_pass(variant, tiny_model_dir, short_window_model_dir):
    torch.manual_seed(0)
    model_dir = short_window_model_dir if variant == "short_window" else tiny_model_dir
    model, processor = load_for_inference(str(model_dir), device="cpu")
    collator = Collator(processor, 2048, "grid" if variant == "grid" else "images")
    scorer = ButtonScorer(model, collator, causal_images=variant == "causal_images")
    items = items_for(scorer)
    lengths = {len(scorer.prompt_ids(i.context, i.question).prefix) for i in items}
    assert max(lengths) - min(lengths) > 100, "prompts of mixed lengths: the batch needs real padding"

    batched = scorer.score_batch(items)
    alone = [scorer.score(i.frames, i.context, i.question, features=i.features) for i in items]
    reversed_batch = scorer.score_batch(items[::-1])[::-1]  # other neighbours, other padding
    for n, (item, b, a, r) in enumerate(zip(items, batched, alone, reversed_batch)):
        reference = reference_logprobs(scorer, item)
        assert_close(a.logprobs, reference, f"sample {n} alone vs full forward")
        assert_close(b.logprobs, reference, f"sample {n} in the batch vs full forward")
        assert_close(b.probabilities, a.probabilities, f"sample {n} probabilities, batch vs alone")
        assert_close(r.probabilities, a.probabilities, f"sample {n} probabilities, reversed batch vs alone")


def test_score_batch_of_nothing_and_a_bad_prompt(tiny_model_dir):
    from pokemon_gemma.collate import SampleError

    model, processor = load_for_inference(str(tiny_model_dir), device="cpu")
    scorer = ButtonScorer(model, Collator(processor, 2048, "images"))
    assert scorer.score_batch([]) == []
    good = ScoreItem([synthetic_frame(k) for k in range(4)], "Goal: reach the door.", QUESTION)
    bad = ScoreItem(good.frames, "<bos> a second one", QUESTION)  # special tokens in a context
    with pytest.raises(SampleError, match="exactly one <bos>"):
        scorer.score_batch([good, bad])


def test_mlx_backend_scores_a_batch_item_by_item_and_says_so(tiny_model_dir, tmp_path):
    """mlx-vlm's Gemma 3 cannot take a left-padded batch exactly (one mask for global and sliding
    layers, one RoPE offset per batch): the MLX backend shares the vision call and says it is not
    batched; its batch answers equal its one-at-a-time answers."""
    pytest.importorskip("mlx_vlm")
    from pokemon_gemma.backends import load_backend
    from pokemon_gemma.export import export_mlx

    export_mlx(tiny_model_dir, tmp_path / "mlx", quantization_bits=None, verify=False)
    backend = load_backend(str(tmp_path / "mlx"))
    assert backend.name == "mlx" and backend.batched_scoring is False
    items = [
        ScoreItem([synthetic_frame(3 * i + k) for k in range(4)], CONTEXTS[i % len(CONTEXTS)], QUESTION)
        for i in range(4)
    ]
    items[1].features = backend.encode_frames(items[1].frames)
    batched = backend.score_batch(items)
    for n, (item, b) in enumerate(zip(items, batched)):
        alone = backend.score(item.frames, item.context, item.question, features=item.features)
        assert_close(b.probabilities, alone.probabilities, f"MLX sample {n}, batch vs alone")
