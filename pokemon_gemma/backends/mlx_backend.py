"""The MLX backend: scoring and generation with an MLX export (made by `export.export_mlx`).

`MlxButtonScorer` is the MLX twin of `scoring.ButtonScorer`: the same prompt (built by the same
`Collator`, with exactly one `<bos>`), the same 8 full answers `{"button": "<b>",`, the same shared
prompt prefix run once and its KV cache repeated 8 times. Only the forward passes run in MLX.

Two differences from PyTorch are kept visible rather than hidden (export verification measures them):
- mlx-vlm's Gemma 3 attends causally inside images; transformers with `token_type_ids` (how the
  model is trained and how `ButtonScorer` scores) attends bidirectionally inside each image.
- mlx-vlm's own prompt path can add a second `<bos>` (its Gemma 3 processor has no chat template,
  so it tokenizes the templated prompt with `add_special_tokens=True`, and a Gemma tokenizer then
  prepends another `<bos>`); we never use it: prompts come from the transformers processor with
  `add_special_tokens=False`, checked to hold exactly one `<bos>`. The export manifest records the
  count that path gives for the exported tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..collate import Collator
from ..dataset import BUTTONS
from ..scoring import ButtonScorer, ButtonScores, Generation, PromptIds, ScoreItem
from . import ScorerBackend, model_version

MLX_DTYPES = ("float32", "bfloat16", "float16")


def import_mlx_vlm():
    """Import mlx_vlm (and its Gemma 3 model) without letting it replace transformers' AutoProcessor.

    Measured with mlx-vlm 0.7.10: importing `mlx_vlm.models.gemma3` patches
    `transformers.AutoProcessor.from_pretrained` process-wide so that any gemma3 folder loads
    mlx-vlm's processor (MLX arrays, no `token_type_ids`), which would silently change the PyTorch
    path of whoever shares the process (the evaluator compares both). We restore the original."""
    from transformers import AutoProcessor

    try:
        import mlx_vlm  # noqa: F401
        import mlx_vlm.models.gemma3  # noqa: F401
    finally:
        AutoProcessor.from_pretrained = _unpatched(AutoProcessor.__dict__["from_pretrained"])
    import mlx_vlm

    return mlx_vlm


def _unpatched(descriptor):
    """transformers' own AutoProcessor.from_pretrained under any chain of mlx-vlm patches (each
    keeps the previous one in its closure as `previous_from_pretrained`), so that the restore also
    works when someone imported an mlx-vlm model before us."""
    func = descriptor.__func__
    while func.__name__ == "_patched_auto_processor_from_pretrained" and func.__closure__:
        cells = dict(zip(func.__code__.co_freevars, (c.cell_contents for c in func.__closure__)))
        previous = cells.get("previous_from_pretrained")
        if previous is None:
            break
        func = previous.__func__
    return classmethod(func)


def load_mlx_model(mlx_dir: str | Path, dtype: str | None = None):
    """(mlx model, its config dict); `dtype` casts every unquantised floating weight (e.g. float32)."""
    import_mlx_vlm()
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_vlm.utils import load_model

    model = load_model(Path(mlx_dir))
    if dtype is not None:
        if dtype not in MLX_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(MLX_DTYPES)}, got {dtype!r}")
        target = getattr(mx, dtype)
        # Quantised weights are uint32 and stay as they are; scales/biases and the rest are cast.
        model.update(
            tree_map(lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
        )
    mx.eval(model.parameters())
    return model


def _repeat_cache(cache: list, n: int) -> list:
    """n copies of a prompt KV cache along the batch axis (the prompt is encoded once)."""
    import mlx.core as mx

    out = []
    for c in cache:
        state = tuple(None if s is None else mx.repeat(s, n, axis=0) for s in c.state)
        out.append(type(c).from_state(state, c.meta_state))
    return out


class MlxButtonScorer(ButtonScorer):
    """8-button scorer and greedy generator over an MLX export folder.

    `frame_layout` must be the one the model was trained with ("images" or "grid"); by default it is
    read from the export's manifest. `dtype` (e.g. "float32") casts the unquantised weights."""

    def __init__(
        self,
        mlx_dir: str | Path,
        *,
        frame_layout: str | None = None,
        dtype: str | None = None,
        max_seq_length: int = 8192,
    ):
        from ..artifacts import frame_layout as recorded_frame_layout
        from ..modeling import load_processor

        self.mlx_dir = Path(mlx_dir)
        if frame_layout is None:
            frame_layout = recorded_frame_layout(self.mlx_dir) or "images"
        model = load_mlx_model(self.mlx_dir, dtype=dtype)
        processor = load_processor(str(self.mlx_dir))
        super().__init__(
            model, Collator(processor, max_seq_length=max_seq_length, frame_layout=frame_layout), causal_images=True
        )

    # --- PyTorch-only properties of the parent do not apply
    @property
    def device(self):
        return "mlx"

    @property
    def dtype(self):
        return None

    def pixel_inputs(self, images: list[Image.Image]) -> dict:
        """The collator's vision inputs as MLX arrays (pixel_values float32; Gemma 4: image_position_ids)."""
        import mlx.core as mx

        return {
            k: mx.array(v.float().numpy() if v.is_floating_point() else v.numpy())
            for k, v in self.collator.pixel_inputs(images).items()
        }

    def pixel_values(self, images: list[Image.Image]):
        return self.pixel_inputs(images)["pixel_values"]

    @property
    def encodes_images(self) -> bool:
        """mlx-vlm's Gemma 4 has `encode_image` (vision tower + embed_vision) and per-layer inputs; its
        Gemma 3 has neither (features come from vision_tower + multi_modal_projector here)."""
        return hasattr(self.model, "encode_image")

    def image_features(self, images: list[Image.Image]):
        """Projected vision features (n_images, tokens, hidden), as the server caches them per frame."""
        if self.encodes_images:
            px = self.pixel_inputs(images)
            return self.model.encode_image(px["pixel_values"], px.get("image_position_ids"))
        pv = self.pixel_values(images)
        # The vision side is never quantised: compute it in the projector's dtype.
        dtype = self.model.multi_modal_projector.mm_input_projection_weight.dtype
        hidden, _, _ = self.model.vision_tower(pv.transpose(0, 2, 3, 1).astype(dtype), output_hidden_states=True)
        return self.model.multi_modal_projector(hidden)

    def _embed(self, input_ids, features=None):
        """Token embeddings with the image features placed on the image soft tokens (mlx-vlm's own merge)."""
        import mlx.core as mx

        embeds = self.model.language_model.model.embed_tokens(input_ids)
        if features is None:
            return embeds
        cfg = self.model.config
        merged, _ = self.model.prepare_inputs_for_multimodal(
            cfg.hidden_size,
            cfg.pad_token_id,
            cfg.image_token_index,
            features,
            embeds,
            input_ids,
            mx.ones(input_ids.shape),
        )
        return merged

    def _forward(self, input_ids, features=None, cache=None):
        """Language-model logits for `input_ids` with image `features` on the image soft tokens."""
        if self.encodes_images:
            # pixel_values only has to be non-None for mlx-vlm to place the cached features.
            emb = self.model.get_input_embeddings(
                input_ids=input_ids, pixel_values=features, cached_image_features=features
            )
            return self.model.language_model(
                input_ids=None, inputs_embeds=emb.inputs_embeds, per_layer_inputs=emb.per_layer_inputs, cache=cache
            ).logits
        return self.model.language_model(input_ids, inputs_embeds=self._embed(input_ids, features), cache=cache).logits

    def logits(self, input_ids: np.ndarray, images: list[Image.Image] | None = None, features=None) -> np.ndarray:
        """Full-sequence logits (T, vocab) as float32 numpy: causal attention everywhere."""
        import mlx.core as mx

        ids = mx.array(np.asarray(input_ids).reshape(1, -1))
        if features is None and images is not None:
            features = self.image_features(images)
        out = self._forward(ids, features)
        return np.array(out[0].astype(mx.float32))

    # mlx-vlm's Gemma 3 takes one attention mask for every layer, global and sliding alike, and one
    # RoPE offset for the whole batch. A left-padded batch needs per-row positions and, once a prompt
    # is longer than the sliding window (every 4-frame prompt of a real model: ~1100 tokens against
    # 1024), different masks for global and sliding layers; neither can be passed. So a batch shares
    # one vision-tower call and then runs its language model item by item.
    batched_scoring = False

    def score_batch(self, items: list[ScoreItem]) -> list[ButtonScores]:
        """Score the 8 answers of every item: the frames of items without `features` go through the
        vision tower in one call, then each item's prompt and answers run on their own."""
        import mlx.core as mx

        missing = [item for item in items if item.features is None]
        if missing:
            images = [self.collator.images_for([], item.frames) for item in missing]
            encoded = self.image_features([im for ims in images for im in ims])
            start, features = 0, {}
            for item, ims in zip(missing, images):
                features[id(item)] = encoded[start : start + len(ims)]
                start += len(ims)
            mx.eval(encoded)
        else:
            features = {}
        return [
            self._score_one(
                self.prompt_ids(item.context, item.question, self.collator.frame_sizes(item.frames)),
                features.get(id(item), item.features),
            )
            for item in items
        ]

    def _score_one(self, prompt: PromptIds, features) -> ButtonScores:
        import mlx.core as mx

        prefix = mx.array([list(prompt.prefix)])
        cache = self.model.language_model.make_cache()
        out = self._forward(prefix, features, cache)
        kept = out[0, -prompt.opening - 1 :].astype(mx.float32)  # the answers' shared opening and first distinct token
        prefix_logprobs = np.array(kept - mx.logsumexp(kept, axis=-1, keepdims=True))
        opening_ids = prompt.prefix[len(prompt.prefix) - prompt.opening :]
        opening = sum(float(prefix_logprobs[j, token]) for j, token in enumerate(opening_ids))
        tails = prompt.tails
        scores = {b: opening + float(prefix_logprobs[-1, t[0]]) for b, t in zip(BUTTONS, tails)}
        width = max(len(t) for t in tails) - 1
        if width > 0:
            # Right padding is harmless: with causal attention no scored token sees a pad.
            pad = self.tokenizer.pad_token_id
            inputs = mx.array([list(t[:-1]) + [pad] * (width - len(t) + 1) for t in tails])
            logits = self.model.language_model(inputs, cache=_repeat_cache(cache, len(BUTTONS))).logits
            logits = logits.astype(mx.float32)
            logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            for i, (b, t) in enumerate(zip(BUTTONS, tails)):
                for j, token in enumerate(t[1:]):
                    scores[b] += float(logprobs[i, j, token])
        return ButtonScores(scores)

    def generate_ids(
        self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96
    ) -> list[int]:
        """Greedy answer token ids, stopping at `<eos>`/`<end_of_turn>` (not included)."""
        return self._generate(frames, context, question, max_new_tokens)[0]

    def _generate(
        self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int
    ) -> tuple[list[int], bool]:
        """(answer ids without the stop token, whether a stop token ended it)."""
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step

        images = self.collator.images_for([], frames)
        prompt = self.collator.prompt_text(context, question)
        enc = self.processor(text=[prompt], images=[images], return_tensors="np", add_special_tokens=False)
        self.collator._check("generation prompt", _as_torch(enc["input_ids"][0]), [im.size for im in images])
        ids = mx.array(enc["input_ids"])
        stop = {self.tokenizer.eos_token_id, self.collator.end_of_turn_id}
        out: list[int] = []
        pixels = self.pixel_inputs(images)
        pixel_values = pixels.pop("pixel_values")  # the rest (Gemma 4: image_position_ids) go as keywords
        for token, _ in generate_step(
            ids, self.model, pixel_values, mx.ones(ids.shape), max_tokens=max_new_tokens, temperature=0.0, **pixels
        ):
            token = int(token)
            if token in stop:
                return out, True
            out.append(token)
        return out, False

    def generate(self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96) -> str:
        """Greedy answer text (the model's JSON, unparsed), like `ButtonScorer.generate`."""
        ids = self.generate_ids(frames, context, question, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_batch(self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96) -> list[str]:
        """One greedy answer per (frames, context, question), generated one after another."""
        return [self.generate(frames, context, question, max_new_tokens) for frames, context, question in items]

    def generate_batch_details(
        self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96
    ) -> list[Generation]:
        out = []
        for frames, context, question in items:
            ids, stopped = self._generate(frames, context, question, max_new_tokens)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(Generation(text, len(ids) + stopped, "stop" if stopped else "length"))
        return out


def _as_torch(ids):
    import torch

    return torch.as_tensor(np.asarray(ids))


class MlxBackend(ScorerBackend):
    """Apple MLX (mlx-vlm) on an exported MLX folder (also runs on Linux CPUs with mlx[cpu])."""

    name = "mlx"

    def __init__(
        self, mlx_dir: str, *, max_seq_length: int = 2048, frame_layout: str = "images", version: str | None = None
    ):
        import mlx.core as mx

        scorer = MlxButtonScorer(mlx_dir, frame_layout=frame_layout, max_seq_length=max_seq_length)
        super().__init__(
            scorer,
            kind="mlx",
            frame_layout=frame_layout,
            version=version or model_version(mlx_dir),
            stack=mx.stack,
            base_model=mlx_dir,
        )
