"""The GGUF backend: scoring and generation with a GGUF export (made by `export.export_gguf`)
through llama-cpp-python (llama.cpp + its multimodal library mtmd; the low-level calls are in
`llama_cpp_model.GgufModel`).

`GgufButtonScorer` is the llama.cpp twin of `scoring.ButtonScorer`:
- Token ids come from the transformers processor files shipped in the export (the same `Collator`
  as training): one `<bos>`, and per frame `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`.
  llama.cpp's tokenizer and chat template are not used (its chat paths drop those `\\n\\n`).
- Frames are resized exactly as the HF image processor does (PIL, stretched to the square size,
  its resample filter) before mtmd sees them: given an image of that size mtmd only normalises it,
  whereas its own Gemma 3 preprocessing letterboxes non-square frames (measured on a trained tiny
  model: 22/30 buttons agreed with raw 240x160 frames, 30/30 pre-resized).
- Text runs of the ids are decoded with `llama_decode`; each run of image soft tokens is replaced by
  that frame's projected features (`mtmd_encode_chunk`), decoded with
  `mtmd_helper_decode_image_chunk`, which attends bidirectionally inside the image for Gemma 3 like
  transformers with `token_type_ids` (training). Features are per frame, so the server's frame
  cache works as with torch.
- The shared prompt prefix is decoded once; each of the 8 answers' tails is decoded after it and
  rolled back with `llama_memory_seq_rm` (a full-size sliding-window cache, so nothing the rollback
  needs was evicted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..artifacts import GGUF_MANIFEST, read_json
from ..collate import Collator
from ..dataset import BUTTONS
from ..scoring import ButtonScores, Generation, ScoreItem, _common_prefix_length, answer_prefix, answer_start
from . import BackendError, ScorerBackend, model_version
from .llama_cpp_model import GgufModel


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def gguf_files(folder: str | Path) -> tuple[Path, Path]:
    """(text model, mmproj) of a GGUF export folder, as its manifest names them."""
    folder = Path(folder)
    manifest = read_json(folder / GGUF_MANIFEST)
    if manifest is None:
        raise BackendError(f"{folder}/{GGUF_MANIFEST}: missing or invalid (not a GGUF export folder)")
    files = manifest.get("files") or {}
    try:
        text, mmproj = folder / files["text"]["name"], folder / files["mmproj"]["name"]
    except (KeyError, TypeError):
        raise BackendError(f"{folder}/{GGUF_MANIFEST}: no files.text/files.mmproj entries") from None
    for path in (text, mmproj):
        if not path.is_file():
            raise BackendError(f"{path}: missing (the GGUF export is incomplete; export it again)")
    return text, mmproj


class GgufButtonScorer:
    """8-button scorer and greedy generator over a GGUF export folder (model-*.gguf, mmproj-*.gguf
    and the transformers tokenizer/processor files)."""

    def __init__(
        self,
        gguf_dir: str | Path,
        *,
        frame_layout: str | None = None,
        max_seq_length: int = 4096,
        n_threads: int | None = None,
        kv_type: str = "f16",
        verbose: bool = False,
    ):
        from ..artifacts import frame_layout as recorded_frame_layout
        from ..modeling import load_processor

        self.gguf_dir = Path(gguf_dir)
        text, mmproj = gguf_files(self.gguf_dir)
        if frame_layout is None:
            frame_layout = recorded_frame_layout(self.gguf_dir) or "images"
        self.collator = Collator(
            load_processor(str(self.gguf_dir)), max_seq_length=max_seq_length, frame_layout=frame_layout
        )
        self.tokenizer = self.collator.tokenizer
        self.processor = self.collator.processor
        ip = self.processor.image_processor
        self.image_size = (int(ip.size["width"]), int(ip.size["height"]))
        self.resample = ip.resample if ip.resample is not None else Image.Resampling.BILINEAR
        n_batch = max(512, self.collator.tokens_per_image)
        # Room for the prompt, an answer and generation, within the model's training context.
        trained = (read_json(self.gguf_dir / "config.json") or {}).get("text_config", {}).get("max_position_embeddings")
        n_ctx = min(max_seq_length + 256, trained) if isinstance(trained, int) else max_seq_length + 256
        self.model = GgufModel(
            text,
            mmproj,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            kv_type=kv_type,
            verbose=verbose,
        )
        n = self.model.image_tokens(self.image_size)
        if n != self.collator.tokens_per_image:
            self.close()
            raise BackendError(
                f"{mmproj}: {n} tokens per image, the processor expects {self.collator.tokens_per_image} "
                "(mmproj and tokenizer files come from different models)"
            )

    # One llama.cpp context with one sequence: a batch is scored item by item.
    batched_scoring = False

    def close(self) -> None:
        self.model.close()

    def resized(self, images: list[Image.Image]) -> list[Image.Image]:
        """The HF image processor's resize (stretch to the square size, its resample filter)."""
        return [im.convert("RGB").resize(self.image_size, resample=self.resample) for im in images]

    def image_features(self, images: list[Image.Image]) -> np.ndarray:
        """Projected features (n_images, tokens, hidden) of model-ready images (`collator.images_for`)."""
        return self.model.encode_images(self.resized(images))

    def _prefix(self, ids: list[int], images: list[Image.Image], features, keep: int | None):
        if features is None:
            features = self.image_features(images)
        return self.model.eval_sequence(ids, self.collator.image_token_id, np.asarray(features), self.image_size, keep)

    def score(self, frames: list[Image.Image], context: str, question: str, features=None) -> ButtonScores:
        """Score the 8 answers for 4 frames; `features` (from `image_features`) skips the projector."""
        import torch

        images = self.collator.images_for([], frames)
        prompt = self.collator.prompt_text(context, question)
        full = [self.collator.expanded_ids(prompt + answer_prefix(b)) for b in BUTTONS]
        shared = _common_prefix_length(full)
        start = answer_start(self.collator, prompt, full, shared)
        self.collator._check("scoring prompt", torch.tensor(full[0][:shared]), [im.size for im in images])
        # As ButtonScorer: log P(full answer | prompt), the answers' shared opening included.
        prefix_logprobs = _log_softmax(self._prefix(full[0][:shared], images, features, shared - start + 1))
        opening = float(sum(prefix_logprobs[j, t] for j, t in enumerate(full[0][start:shared])))
        scores = {}
        for button, ids in zip(BUTTONS, full):
            tail = ids[shared:]
            score = opening + float(prefix_logprobs[-1, tail[0]])
            if len(tail) > 1:
                logprobs = _log_softmax(self.model.decode_tokens(tail[:-1], len(tail) - 1))
                score += float(sum(logprobs[j, t] for j, t in enumerate(tail[1:])))
                self.model.rollback(shared)
            scores[button] = score
        return ButtonScores(scores)

    def score_batch(self, items: list[ScoreItem]) -> list[ButtonScores]:
        return [self.score(i.frames, i.context, i.question, features=i.features) for i in items]

    def logits(self, input_ids: list[int], frames: list[Image.Image]) -> np.ndarray:
        """(T, vocab) float32 logits of a full sequence; NaN rows at image positions."""
        images = self.collator.images_for([], frames)
        return self._prefix(list(input_ids), images, None, None)

    def generate_ids(self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96):
        """Greedy answer token ids, stopping at `<eos>`/`<end_of_turn>` (not included)."""
        return self._generate(frames, context, question, max_new_tokens)[0]

    def _generate(self, frames, context: str, question: str, max_new_tokens: int) -> tuple[list[int], bool]:
        """(answer ids without the stop token, whether a stop token ended it)."""
        import torch

        images = self.collator.images_for([], frames)
        ids = self.collator.expanded_ids(self.collator.prompt_text(context, question))
        self.collator._check("generation prompt", torch.tensor(ids), [im.size for im in images])
        stop = {self.tokenizer.eos_token_id, self.collator.end_of_turn_id}
        logits = self._prefix(ids, images, None, 1)[0]
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token in stop:
                return out, True
            if self.model.n_past >= self.model.n_ctx:
                break
            out.append(token)
            logits = self.model.decode_tokens([token], 1)[0]
        return out, False

    def generate(self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96) -> str:
        ids = self.generate_ids(frames, context, question, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_batch(self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96) -> list[str]:
        return [g.text for g in self.generate_batch_details(items, max_new_tokens)]

    def generate_batch_details(
        self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96
    ) -> list[Generation]:
        """Greedy answers one after another, with token counts and why each ended (OpenAI usage)."""
        out = []
        for frames, context, question in items:
            ids, stopped = self._generate(frames, context, question, max_new_tokens)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(Generation(text, len(ids) + stopped, "stop" if stopped else "length"))
        return out


class GgufBackend(ScorerBackend):
    """llama.cpp (llama-cpp-python) on a GGUF export folder, on the CPU."""

    name = "gguf"

    def __init__(
        self,
        gguf_dir: str,
        *,
        max_seq_length: int = 2048,
        frame_layout: str = "images",
        version: str | None = None,
        n_threads: int | None = None,
    ):
        scorer = GgufButtonScorer(
            gguf_dir, frame_layout=frame_layout, max_seq_length=max_seq_length, n_threads=n_threads
        )
        super().__init__(
            scorer,
            kind="gguf",
            frame_layout=frame_layout,
            version=version or model_version(gguf_dir),
            stack=np.stack,
            base_model=gguf_dir,
        )
