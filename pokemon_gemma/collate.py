"""One collator for training, batch-size probing, validation and scoring.

A sample is the model's chat template: a user turn with 4 image entries (or one 2x2 grid image) then
the context and question, and a model turn with the answer JSON. Each image placeholder is expanded
into its soft tokens (how, and how many, is the model family's: `pokemon_gemma.families`); labels
cover only the answer and the token closing the turn (`<end_of_turn>`, Gemma 4 `<turn|>`). Image
tokens and the answer are never truncated: an over-long sample loses context text first, else it
is rejected.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from .dataset import FRAMES_PER_SAMPLE, MAX_FRAME_PIXELS, Record
from .families import family_of_processor

IGNORE_INDEX = -100
GRID_NOTE = (
    "The 4 frames are tiled 2x2 in one image: oldest top-left, then top-right, bottom-left, newest bottom-right."
)


class SampleError(ValueError):
    """A sample that cannot be trained on as is; the message names the sample (one line).

    Raised in a DataLoader worker, torch re-raises it in the training process with the worker's
    traceback in the message: only the original last line is kept, so the error stays one line."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.partition(f"{SampleError.__name__}: ")[2] or last
        super().__init__(message)


@dataclass
class EncodedSample:
    sample_id: str
    input_ids: torch.Tensor  # (T,)
    token_type_ids: torch.Tensor  # (T,) 1 on image soft tokens (batched under the family's key)
    labels: torch.Tensor | None  # (T,) IGNORE_INDEX outside the answer
    pixel_values: torch.Tensor  # (n_images, 3, H, W); Gemma 4: (n_images, patches, 3*patch^2)
    context_shortened: bool = False
    pixel_extras: dict[str, torch.Tensor] | None = None  # other vision inputs (Gemma 4: image_position_ids)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_labels(self) -> int:
        return 0 if self.labels is None else int((self.labels != IGNORE_INDEX).sum())


def tile_grid(frames: list[Image.Image]) -> Image.Image:
    """Tile 4 frames 2x2 into one image (a quarter of the image tokens of 4 separate images)."""
    w, h = frames[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for i, frame in enumerate(frames):
        grid.paste(frame.resize((w, h)), ((i % 2) * w, (i // 2) * h))
    return grid


def declared_size(path: str) -> tuple[int, int] | None:
    """(width, height) an image file declares, read from its header without decoding anything (and
    without PIL's decompression-bomb check, which refuses the largest before saying their size)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def too_large(path: str) -> str | None:
    """Why a frame is too large to decode (its header declares more than MAX_FRAME_PIXELS), else None."""
    size = declared_size(path)
    if size is not None and size[0] * size[1] > MAX_FRAME_PIXELS:
        return f"frame declares {size[0]}x{size[1]} pixels, more than {MAX_FRAME_PIXELS} (a decompression bomb?)"
    return None


def open_frame(path: str) -> Image.Image:
    """A frame decoded to RGB; SampleError (one line, naming the file) when it cannot be, or when its
    header declares more than MAX_FRAME_PIXELS (checked before a pixel is decoded)."""
    problem = too_large(path)
    if problem:
        raise SampleError(f"{path}: {problem} (delete it or re-convert)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SampleError(f"{path}: cannot decode frame ({exc})") from None


class FrameLoader:
    """Decodes frames to RGB with a small LRU cache: a frame recurs in up to 4 sliding windows."""

    def __init__(self, cache_size: int = 512):
        self.cache: OrderedDict[str, Image.Image] = OrderedDict()
        self.cache_size = cache_size

    def load(self, path: str) -> Image.Image:
        image = self.cache.get(path)
        if image is not None:
            self.cache.move_to_end(path)
            return image
        image = open_frame(path)
        self.cache[path] = image
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return image


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (0, 0, 0))


class Collator:
    """Turns Records into model batches (padded on the right).

    `encode` checks every sample: exactly one `<bos>`, image soft tokens == the sum of what each
    image gets, and (with an answer) at least one labelled token.

    Lengths computed without the images (`sample_length`, `fit_context` without `sizes`) read the
    frames' declared sizes, or assume the most soft tokens an image can get (Gemma 4's budget).
    """

    def __init__(
        self,
        processor,
        max_seq_length: int = 2048,
        frame_layout: str = "images",
        blank_frames: bool = False,
        pixel_dtype: torch.dtype = torch.float32,
    ):
        if frame_layout not in ("images", "grid"):
            raise ValueError(f"frame_layout must be images or grid, got {frame_layout!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_seq_length = max_seq_length
        self.frame_layout = frame_layout
        self.blank_frames = blank_frames
        self.pixel_dtype = pixel_dtype
        self.frames = FrameLoader()
        self.family = family_of_processor(processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.image_token)
        self.end_of_turn = self.family.end_of_turn
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(self.end_of_turn)
        self.placeholder = self.family.image_placeholder(processor)
        self.tokens_per_image = self.family.max_tokens_per_image(processor)  # the most one image gets
        self.n_images = 1 if frame_layout == "grid" else FRAMES_PER_SAMPLE

    # --- text
    def user_text(self, context: str, question: str) -> str:
        parts = [p for p in (context.strip(), question.strip()) if p]
        if self.frame_layout == "grid":
            parts.insert(0, GRID_NOTE)
        return "\n\n".join(parts)

    def prompt_text(self, context: str, question: str) -> str:
        """The templated prompt up to and including `<start_of_turn>model\\n`."""
        content = [{"type": "image"} for _ in range(self.n_images)]
        content.append({"type": "text", "text": self.user_text(context, question)})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def images_for(self, frame_paths: list[str], images: list[Image.Image] | None = None) -> list[Image.Image]:
        frames = images if images is not None else [self.frames.load(p) for p in frame_paths]
        if len(frames) != FRAMES_PER_SAMPLE:
            raise SampleError(f"expected {FRAMES_PER_SAMPLE} frames, got {len(frames)}")
        if self.blank_frames:
            frames = [blank_like(f) for f in frames]
        return [tile_grid(frames)] if self.frame_layout == "grid" else frames

    def answer_text(self, output: str) -> str:
        """The model turn's text after the prompt: the answer and the turn's closing token."""
        return output.strip() + self.end_of_turn + "\n"

    def image_counts(self, sizes: list[tuple[int, int]] | None, n_images: int) -> list[int]:
        """Soft tokens of each image ((width, height) sizes; None: the most an image can get)."""
        if sizes is None:
            return [self.tokens_per_image] * n_images
        return [self.family.tokens_per_image(self.processor, size) for size in sizes]

    def frame_sizes(self, frames: list[Image.Image]) -> list[tuple[int, int]]:
        """The sizes of the images the model sees for these frames (no pixels touched)."""
        return self.layout_sizes([f.size for f in frames])

    def layout_sizes(self, frame_sizes: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        """The sizes of the images the model sees for frames of `frame_sizes` (one grid, or the frames)."""
        if frame_sizes is None or any(size is None for size in frame_sizes):
            return None
        if self.frame_layout == "grid":
            width, height = frame_sizes[0]
            return [(2 * width, 2 * height)]
        return list(frame_sizes)

    def record_sizes(self, record: Record) -> list[tuple[int, int]] | None:
        """Image sizes of a record from its frames' headers (no decoding); None when unreadable."""
        return self.layout_sizes([declared_size(p) for p in record.frames]) if record.frames else None

    def _expanded_token_count(self, text: str, sizes: list[tuple[int, int]] | None = None) -> int:
        """Token count of templated text once every image is expanded into its soft tokens."""
        return len(self.expanded_ids(text, sizes))

    # --- encoding
    def encode(
        self, record: Record, with_answer: bool = True, images: list[Image.Image] | None = None
    ) -> EncodedSample:
        sample_id = record.sample_id
        answer = self.answer_text(record.output) if with_answer else ""
        imgs = self.images_for(record.frames, images)
        sizes = [im.size for im in imgs]
        context, shortened = self.fit_context(record.context, record.question, answer, sample_id, sizes)
        prompt = self.prompt_text(context, record.question)
        # What the processor does, without its per-call overhead: expand each image placeholder
        # into its soft tokens, tokenize, and mark image tokens (bidirectional attention where the
        # family has it).
        input_ids = torch.tensor(self.expanded_ids(prompt + answer, sizes))
        token_type_ids = (input_ids == self.image_token_id).long()
        self._check(sample_id, input_ids, sizes)
        labels = None
        if with_answer:
            prompt_ids = self.expanded_ids(prompt, sizes)
            n_prompt = len(prompt_ids)
            if input_ids[:n_prompt].tolist() != prompt_ids:
                raise SampleError(f"{sample_id}: the prompt tokenizes differently inside the full sample")
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            eot_positions = (input_ids == self.end_of_turn_id).nonzero().flatten()
            answer_end = int(eot_positions[-1]) + 1 if len(eot_positions) else 0
            labels[n_prompt:answer_end] = input_ids[n_prompt:answer_end]
            if answer_end <= n_prompt:
                raise SampleError(f"{sample_id}: no labelled answer tokens")
            # Exact labels: the supervised tokens must decode to the answer and the turn's end.
            supervised = self.tokenizer.decode(input_ids[n_prompt:answer_end])
            if supervised.strip() != answer.strip():
                raise SampleError(f"{sample_id}: labels do not align with the answer ({supervised[:40]!r}...)")
        pixels = self.pixel_inputs(imgs)
        pixel_values = pixels.pop("pixel_values")
        return EncodedSample(
            sample_id, input_ids, token_type_ids, labels, pixel_values, shortened, pixel_extras=pixels or None
        )

    def expanded_ids(self, text: str, sizes: list[tuple[int, int]] | None = None) -> list[int]:
        """Token ids of templated text with every image placeholder expanded to its soft tokens
        (image i of size sizes[i]; None: the most soft tokens an image can get)."""
        parts = text.split(self.placeholder)
        counts = self.image_counts(sizes, len(parts) - 1)
        if len(counts) != len(parts) - 1:
            raise SampleError(f"{len(parts) - 1} image placeholders in the prompt, {len(counts)} images")
        pieces = [parts[0]]
        for count, part in zip(counts, parts[1:]):
            pieces += [self.family.image_sequence(self.processor, count), part]
        return self.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Everything the vision side takes for `images` (pixel_values, and Gemma 4's image_position_ids)."""
        return self.family.pixel_inputs(self.processor, images, self.pixel_dtype)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.pixel_inputs(images)["pixel_values"]

    def _check(self, sample_id: str, input_ids: torch.Tensor, sizes: list[tuple[int, int]] | None) -> None:
        n_bos = int((input_ids == self.tokenizer.bos_token_id).sum())
        if n_bos != 1:
            raise SampleError(f"{sample_id}: expected exactly one <bos>, found {n_bos}")
        n_soft = int((input_ids == self.image_token_id).sum())
        counts = self.image_counts(sizes, self.n_images if sizes is None else len(sizes))
        if n_soft != sum(counts):
            raise SampleError(f"{sample_id}: {n_soft} image soft tokens, expected {' + '.join(map(str, counts))}")

    def sample_length(self, record: Record, with_answer: bool = True) -> int:
        """Token length with every image soft token, before any shortening (no image decoding)."""
        answer = self.answer_text(record.output) if with_answer else ""
        text = self.prompt_text(record.context, record.question) + answer
        return self._expanded_token_count(text, self.record_sizes(record))

    def fit_context(
        self, context: str, question: str, answer: str, sample_id: str, sizes: list[tuple[int, int]] | None = None
    ) -> tuple[str, bool]:
        """Shorten the context (keeping its start: the goal) until the sample fits, else reject."""
        length = self._expanded_token_count(self.prompt_text(context, question) + answer, sizes)
        if length <= self.max_seq_length:
            return context, False
        ctx_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        keep = len(ctx_ids) - (length - self.max_seq_length)
        while keep > 0:
            shorter = self.tokenizer.decode(ctx_ids[:keep]).rstrip() + " …"
            if self._expanded_token_count(self.prompt_text(shorter, question) + answer, sizes) <= self.max_seq_length:
                return shorter, True
            keep -= max(1, len(ctx_ids) // 20)
        if self._expanded_token_count(self.prompt_text("", question) + answer, sizes) <= self.max_seq_length:
            return "", True
        raise SampleError(
            f"{sample_id}: {length} tokens exceed --max_seq_length {self.max_seq_length} even without context "
            f"(images and answer are never truncated; raise --max_seq_length or use --frame_layout grid)"
        )

    # --- batching
    def pad(self, samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
        width = max(s.length for s in samples)
        pad_id = self.tokenizer.pad_token_id

        def stack(attr: str, fill: int) -> torch.Tensor:
            out = torch.full((len(samples), width), fill, dtype=torch.long)
            for i, s in enumerate(samples):
                out[i, : s.length] = getattr(s, attr)
            return out

        lengths = torch.tensor([s.length for s in samples])
        batch = {
            "input_ids": stack("input_ids", pad_id),
            "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
            self.family.token_type_key: stack("token_type_ids", 0),
            "pixel_values": torch.cat([s.pixel_values for s in samples]),
        }
        for key in samples[0].pixel_extras or {}:
            batch[key] = torch.cat([s.pixel_extras[key] for s in samples])
        if all(s.labels is not None for s in samples):
            batch["labels"] = stack("labels", IGNORE_INDEX)
        return batch

    def __call__(self, records: list[Record]) -> dict[str, torch.Tensor]:
        return self.pad([self.encode(r) for r in records])
