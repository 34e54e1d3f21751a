"""The 8-button scorer shared by training-time eval, evaluate.py and the server.

The predicted button is the highest-scoring of the 8 full answers `{"button": "<b>",`, each scored
as log P(answer | prompt): the prompt and the answers' shared opening (images included) run once,
its KV cache is repeated 8 times, and only the short continuations run again. Equal, within float
error, to 8 ordinary full forward passes (tests/test_reference.py). First-token logits would not
do: `a` and `b` can share their first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from .collate import Collator
from .dataset import BUTTONS, Record, parse_output


def answer_prefix(button: str) -> str:
    """The part of `dataset.make_output` that names the button, up to the comma that closes it."""
    return f'{{"button": "{button}",'


@dataclass
class ButtonScores:
    logprobs: dict[str, float]  # summed log-prob of each full answer prefix

    @property
    def button(self) -> str:
        return max(self.logprobs, key=self.logprobs.get)

    @property
    def probabilities(self) -> dict[str, float]:
        top = max(self.logprobs.values())
        exp = {b: math.exp(v - top) for b, v in self.logprobs.items()}
        total = sum(exp.values())
        return {b: v / total for b, v in exp.items()}


@dataclass
class Generation:
    """A greedy answer with what the OpenAI API reports about it."""

    text: str
    completion_tokens: int  # tokens generated, the stop token included when there is one
    finish_reason: str  # "stop": a stop token ended it; "length": max_new_tokens ran out first


class ButtonScorer:
    def __init__(self, model, collator: Collator, causal_images: bool = False):
        self.model = model
        self.collator = collator
        # causal_images: no token_type_ids, so images attend causally as in an MLX export (verification).
        self.causal_images = causal_images
        self.tokenizer = collator.tokenizer
        self.processor = collator.processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def _gemma(self):
        """The Gemma3ForConditionalGeneration under any PEFT wrapper."""
        model = self.model
        while not hasattr(model, "lm_head") or not hasattr(model, "model"):
            model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
        return model

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.collator.pixel_values(images).to(self.device, self.dtype)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected vision features (n_images, tokens, hidden); the server caches these per frame."""
        return self._gemma().model.get_image_features(self.pixel_values(images), return_dict=True).pooler_output

    @torch.no_grad()
    def score(
        self, frames: list[Image.Image], context: str, question: str, features: torch.Tensor | None = None
    ) -> ButtonScores:
        """Score the 8 answers for 4 frames. `features` (from `image_features`) skips the vision tower."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        images = self.collator.images_for([], frames)
        prompt = self.collator.prompt_text(context, question)
        full = [self.collator.expanded_ids(prompt + answer_prefix(b)) for b in BUTTONS]
        shared = _common_prefix_length(full)
        start = answer_start(self.collator, prompt, full, shared)
        prefix = torch.tensor([full[0][:shared]], device=self.device)
        self.collator._check("scoring prompt", prefix[0], len(images))
        if features is None:
            features = self.image_features(images)
        encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=features.to(self.device))}
        out = self.model(
            input_ids=prefix,
            token_type_ids=None if self.causal_images else (prefix == self.collator.image_token_id).long(),
            attention_mask=torch.ones_like(prefix),
            mm_encoder_outputs=encoder_outputs,
            use_cache=True,
            logits_to_keep=shared - start + 1,  # the answers' shared opening and the first distinct token
        )
        prefix_logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
        opening = sum(float(prefix_logprobs[j, token]) for j, token in enumerate(full[0][start:shared]))
        tails = [ids[shared:] for ids in full]
        scores = {b: opening + float(prefix_logprobs[-1, t[0]]) for b, t in zip(BUTTONS, tails)}
        width = max(len(t) for t in tails) - 1
        if width > 0:
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(BUTTONS))
            pad = self.tokenizer.pad_token_id
            inputs = torch.tensor([t[:-1] + [pad] * (width - len(t) + 1) for t in tails], device=self.device)
            mask = torch.tensor([[1] * (len(t) - 1) + [0] * (width - len(t) + 1) for t in tails], device=self.device)
            attention = torch.cat([torch.ones(len(BUTTONS), shared, dtype=torch.long, device=self.device), mask], 1)
            logits = self.model(input_ids=inputs, attention_mask=attention, past_key_values=cache).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for i, (b, t) in enumerate(zip(BUTTONS, tails)):
                for j, token in enumerate(t[1:]):
                    scores[b] += float(logprobs[i, j, token])
        return ButtonScores(scores)

    def score_record(self, record: Record) -> ButtonScores:
        frames = [self.collator.frames.load(p) for p in record.frames]
        return self.score(frames, record.context, record.question)

    def generate(self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96) -> str:
        """Greedy answer text (the model's JSON, unparsed)."""
        return self.generate_batch([(frames, context, question)], max_new_tokens)[0]

    def generate_batch(self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96) -> list[str]:
        """Greedy answers for several (frames, context, question) at once (prompts padded on the left)."""
        return [g.text for g in self.generate_batch_details(items, max_new_tokens)]

    @torch.no_grad()
    def generate_batch_details(
        self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96
    ) -> list[Generation]:
        """`generate_batch` with each answer's token count and why it ended."""
        texts = [self.collator.prompt_text(context, question) for _, context, question in items]
        images = [self.collator.images_for([], frames) for frames, _, _ in items]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation appends on the right
        try:
            enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        eot = self.collator.end_of_turn_id
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[self.tokenizer.eos_token_id, eot],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        width = enc["input_ids"].shape[1]
        stops = {self.tokenizer.eos_token_id, eot}
        results = []
        for row in out:
            new = row[width:].tolist()
            end = next((i + 1 for i, token in enumerate(new) if token in stops), None)
            text = self.tokenizer.decode(row[width:], skip_special_tokens=True).strip()
            results.append(Generation(text, end or len(new), "stop" if end else "length"))
        return results


def parse_generated(text: str) -> tuple[dict | None, str | None]:
    """(parsed answer, None) or (None, 'invalid_json' | 'invalid_button')."""
    try:
        return parse_output(text), None
    except ValueError as exc:
        return None, "invalid_json" if "not JSON" in str(exc) or "not a JSON object" in str(exc) else "invalid_button"


def answer_start(collator: Collator, prompt: str, full: list[list[int]], shared: int) -> int:
    """Index of the first answer token: where the prompt's own ids stop matching the full sequences
    (a token merged across the prompt/answer boundary counts as answer). The answers' shared opening
    `{"button": "` is scored too, so each score is log P(full answer prefix | prompt)."""
    return min(_common_prefix_length([collator.expanded_ids(prompt), full[0]]), shared)


def _common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n
