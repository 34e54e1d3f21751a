"""The 8-button scorer shared by training-time eval, evaluate.py and the server.

The predicted button is the highest-scoring of the 8 full answers `{"button": "<b>",`, each scored
as log P(answer | prompt): the prompt and the answers' shared opening (images included) run once,
its KV cache is repeated 8 times, and only the short continuations run again. Equal, within float
error, to 8 ordinary full forward passes (tests/test_reference.py). First-token logits would not
do: `a` and `b` can share their first token.

Several samples are scored together in two forward passes (`score_batch`; `score` is its one-item
case): one prompt pass over the samples' prompts, padded on the left, and one answer pass over
batch x 8 rows, each sample's KV cache repeated 8 times. Padding changes no real token's attention or
position: pads are masked out of every attention row, position ids count real tokens only (so a
padded prompt has the positions it has alone), and with left padding the distance between two real
tokens is the same in index and position, which keeps Gemma 3's sliding windows (index based) exact.
Left padding also ends every prompt at the same column, so the shared openings' log-probs are read
from the last logits of each row. The answers' tails are padded on the right, where causal attention
keeps them unseen.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

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
class ScoreItem:
    """One sample to score: 4 frames (oldest first), its context (already fitted) and question, and
    optionally the vision features of its images (`image_features` of them, stacked), which skip the
    vision tower."""

    frames: list[Image.Image]
    context: str
    question: str
    features: Any | None = None


@dataclass(frozen=True)
class PromptIds:
    """A prompt's token ids for scoring: `prefix` is shared by the 8 answers (the prompt and the start
    of the answers they have in common), `tails` are each answer's remaining ids, in BUTTONS order."""

    prefix: tuple[int, ...]
    tails: tuple[tuple[int, ...], ...]
    n_images: int
    opening: int  # the last `opening` ids of `prefix` are the answers' shared opening, scored too


@dataclass
class Generation:
    """A greedy answer with what the OpenAI API reports about it."""

    text: str
    completion_tokens: int  # tokens generated, the stop token included when there is one
    finish_reason: str  # "stop": a stop token ended it; "length": max_new_tokens ran out first


class ButtonScorer:
    batched_scoring = True  # score_batch runs a batch as one prompt pass and one answer pass
    PROMPT_CACHE_SIZE = 256  # tokenized prompts kept (a served session asks the same question each step)

    def __init__(self, model, collator: Collator, causal_images: bool = False):
        self.model = model
        self.collator = collator
        # causal_images: no token_type_ids, so images attend causally as in an MLX export (verification).
        self.causal_images = causal_images
        self.tokenizer = collator.tokenizer
        self.processor = collator.processor
        self._prompts: OrderedDict[str, PromptIds] = OrderedDict()

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

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.collator.pixel_inputs(images)
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in out.items()
        }

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]):
        """Projected vision features (Gemma 3: one (n_images, tokens, hidden) tensor; Gemma 4: a tuple of
        per-image (tokens, hidden) tensors); the server caches these per frame."""
        return self.collator.family.image_features(self._gemma().model, self.pixel_inputs(images))

    def prompt_ids(self, context: str, question: str, sizes: list[tuple[int, int]] | None = None) -> PromptIds:
        """Token ids of the prompt and the 8 answers for images of `sizes` (Gemma 4's soft tokens per image
        depend on it), checked: one `<bos>`, every image soft token. Each answer is tokenized together
        with its prompt, as in training; results are cached."""
        prompt = self.collator.prompt_text(context, question)
        key = (prompt, tuple(sizes) if sizes else None)
        cached = self._prompts.get(key)
        if cached is not None:
            self._prompts.move_to_end(key)
            return cached
        full = [self.collator.expanded_ids(prompt + answer_prefix(b), sizes) for b in BUTTONS]
        shared = _common_prefix_length(full)
        start = answer_start(self.collator, prompt, full, shared, sizes)
        n_images = self.collator.n_images
        self.collator._check("scoring prompt", torch.tensor(full[0][:shared]), sizes)
        ids = PromptIds(tuple(full[0][:shared]), tuple(tuple(f[shared:]) for f in full), n_images, shared - start)
        self._prompts[key] = ids
        while len(self._prompts) > self.PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return ids

    def score(
        self, frames: list[Image.Image], context: str, question: str, features: torch.Tensor | None = None
    ) -> ButtonScores:
        """Score the 8 answers for 4 frames. `features` (from `image_features`) skips the vision tower."""
        return self.score_batch([ScoreItem(frames, context, question, features)])[0]

    @torch.no_grad()
    def score_batch(self, items: list[ScoreItem]) -> list[ButtonScores]:
        """Score the 8 answers of every item: one prompt pass and one answer pass for the whole batch.
        Raises `collate.SampleError` (a ValueError) when an item's prompt is malformed."""
        if not items:
            return []
        prompts = [
            self.prompt_ids(item.context, item.question, self.collator.frame_sizes(item.frames)) for item in items
        ]
        features = self._batch_features(items)
        kept, cache, lengths, mask = self._prompt_pass(prompts, features)
        scores = torch.stack([kept[i, -1, [t[0] for t in p.tails]] for i, p in enumerate(prompts)]).double()  # (B, 8)
        scores = scores + self._opening_logprobs(prompts, kept)[:, None]
        width = max(len(t) for p in prompts for t in p.tails) - 1
        if width > 0:
            scores = scores + self._answer_pass(prompts, cache, lengths, mask, width)
        return [ButtonScores(dict(zip(BUTTONS, row))) for row in scores.tolist()]

    @staticmethod
    def _opening_logprobs(prompts: list[PromptIds], kept: torch.Tensor) -> torch.Tensor:
        """Summed log-probs (B,) of each prompt's answer opening (its prefix's last `opening` ids, at
        the same columns in every row thanks to the left padding). The logits at column c predict the
        token at c + 1, so opening token j of n is read from kept column K - n - 1 + j."""
        rows, columns, tokens = [], [], []
        for i, p in enumerate(prompts):
            for j, token in enumerate(p.prefix[len(p.prefix) - p.opening :]):
                rows.append(i)
                columns.append(kept.shape[1] - p.opening - 1 + j)
                tokens.append(token)
        total = torch.zeros(len(prompts), dtype=torch.float64, device=kept.device)
        if rows:
            index = [torch.tensor(x, device=kept.device) for x in (rows, columns, tokens)]
            total.index_add_(0, index[0], kept[index[0], index[1], index[2]].double())
        return total

    def _batch_features(self, items: list[ScoreItem]) -> torch.Tensor:
        """(sum of n_images, tokens, hidden) in item order; items without features share one vision call."""
        missing = [i for i, item in enumerate(items) if item.features is None]
        computed: dict[int, torch.Tensor] = {}
        if missing:
            images = [self.collator.images_for([], items[i].frames) for i in missing]
            encoded = self.image_features([im for ims in images for im in ims])
            start = 0
            for i, ims in zip(missing, images):
                computed[i] = encoded[start : start + len(ims)]
                start += len(ims)
        parts = [computed[i] if item.features is None else item.features for i, item in enumerate(items)]
        # Per-image features in item order, as the family takes them back (Gemma 3 stacked, Gemma 4 a tuple).
        return self.collator.family.features_input([f for part in parts for f in part], self.device)

    def _prompt_pass(self, prompts: list[PromptIds], features: torch.Tensor):
        """Run the prompts, padded on the left: (log-probs (B, K, vocab) of the last K columns, K covering
        every prompt's opening and its first distinct token; KV cache; real prompt lengths (B,); 2-D
        attention mask (B, S))."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        lengths = torch.tensor([len(p.prefix) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.prefix) :] = torch.tensor(p.prefix)
        ids = ids.to(self.device)
        pads = (width - lengths)[:, None]
        columns = torch.arange(width, device=self.device)[None, :]
        mask = (columns >= pads).long()
        positions = (columns - pads).clamp(min=0)
        token_type_ids = None if self.causal_images else (ids == self.collator.image_token_id).long()
        out = self.model(
            input_ids=ids,
            attention_mask=self.prompt_masks(mask, token_type_ids),
            position_ids=positions,
            **{self.collator.family.token_type_key: token_type_ids},
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            use_cache=True,
            logits_to_keep=max(p.opening for p in prompts) + 1,
        )
        return torch.log_softmax(out.logits.float(), dim=-1), out.past_key_values, lengths, mask

    def prompt_masks(self, mask: torch.Tensor, token_type_ids: torch.Tensor | None):
        """The prompt pass's 4-D attention masks {"full_attention", "sliding_attention"}, built as
        transformers builds them for Gemma 3 (`create_masks_for_vision_model`: causal, or within the
        same image; a sliding window on sliding layers; pads masked) but by broadcasting instead of its
        vmap, which alone costs as much as the tiny model's forward pass. Additive (0 where attended,
        the dtype's minimum elsewhere, as transformers' eager masks): a masked key gets exactly zero
        weight, a pad's own all-masked row stays finite, and CPU sdpa runs 1.2-1.9x faster than with
        a boolean mask (measured). Only for the sdpa and eager attention implementations; otherwise
        the 2-D mask, and the model builds its own."""
        config = self._gemma().config.get_text_config()
        implementation = getattr(config, "_attn_implementation", None)
        if (
            not self.collator.family.fast_prompt_masks
            or implementation not in ("sdpa", "eager")
            or getattr(config, "use_bidirectional_attention", False)
        ):
            return mask
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        index = torch.arange(mask.shape[1], device=mask.device)
        query, key = index[:, None], index[None, :]
        allowed = (key <= query)[None] & mask.bool()[:, None, :]  # (B, S, S)
        if token_type_ids is not None:
            blocks = get_block_sequence_ids_for_mask(token_type_ids, device=mask.device)
            same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            allowed = allowed | (same_image & mask.bool()[:, None, :])
        masks = {"full_attention": allowed[:, None]}
        window = getattr(config, "sliding_window", None)
        if window is not None:
            masks["sliding_attention"] = (allowed & (key > query - window)[None])[:, None]
        zero, low = torch.zeros((), dtype=self.dtype, device=mask.device), torch.finfo(self.dtype).min
        return {k: torch.where(v, zero, low) for k, v in masks.items()}

    def _answer_pass(self, prompts: list[PromptIds], cache, lengths, mask, width: int) -> torch.Tensor:
        """Summed log-probs (B, 8) of every answer's tokens after its first, over batch x 8 rows."""
        n = len(BUTTONS)
        cache.batch_repeat_interleave(n)
        tails = [t for p in prompts for t in p.tails]  # row r = sample r // 8, button r % 8
        pad = self.tokenizer.pad_token_id
        inputs = torch.tensor([list(t[:-1]) + [pad] * (width - len(t) + 1) for t in tails], device=self.device)
        targets = torch.tensor([list(t[1:]) + [0] * (width - len(t) + 1) for t in tails], device=self.device)
        valid = torch.tensor([[j < len(t) - 1 for j in range(width)] for t in tails], device=self.device)
        attention = torch.cat([mask.repeat_interleave(n, 0), valid.long()], 1)
        positions = lengths.repeat_interleave(n)[:, None] + torch.arange(width, device=self.device)[None, :]
        logits = self.model(
            input_ids=inputs, attention_mask=attention, position_ids=positions, past_key_values=cache
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return (logprobs.double() * valid).sum(-1).view(len(prompts), n)

    def score_record(self, record: Record) -> ButtonScores:
        return self.score_records([record])[0]

    def score_records(self, records: list[Record]) -> list[ButtonScores]:
        """Score records as one batch (their frames loaded by the collator's frame loader)."""
        items = [ScoreItem([self.collator.frames.load(p) for p in r.frames], r.context, r.question) for r in records]
        return self.score_batch(items)

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


def answer_start(collator: Collator, prompt: str, full: list[list[int]], shared: int, sizes=None) -> int:
    """Index of the first answer token: where the prompt's own ids stop matching the full sequences
    (a token merged across the prompt/answer boundary counts as answer). The answers' shared opening
    `{"button": "` is scored too, so each score is log P(full answer prefix | prompt)."""
    return min(_common_prefix_length([collator.expanded_ids(prompt, sizes), full[0]]), shared)


def _common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n
