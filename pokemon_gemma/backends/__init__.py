"""One interface over everything that runs a model: the stages (evaluate, serve, play, export
verification) talk to a `Backend` and never to torch, MLX or llama.cpp directly.

    backend.score(frames, context, question, features=None) -> ButtonScores   # the 8 full answers
    backend.score_batch([ScoreItem(frames, context, question, features), ...]) -> [ButtonScores]
    backend.generate(frames, context, question, max_new_tokens) -> str        # greedy answer text
    backend.generate_batch([(frames, context, question), ...], max_new_tokens) -> [str]
    backend.encode_frames(images) -> [per-frame features]   # when supports_features (server cache)
    backend.fit_context(context, question) -> str           # shortened to fit the context window
    backend.generate_details(frames, context, question, max_new_tokens) -> Generation  # + tokens, finish
    backend.prompt_tokens(context, question) -> int          # the prompt's tokens, image tokens included
    backend.count_tokens(text) -> int
    backend.frame_input() -> ((width, height), resample) | None   # what the image processor resizes to

`frames` are the 4 decoded PIL frames, oldest first; `features` are per-frame vision features from
`encode_frames` (or None: the backend runs the vision tower). `score` is the one-item case of
`score_batch`; `batched_scoring` says whether a batch runs as one model pass (torch: one prompt pass
and one answer pass for the whole batch) or item by item (MLX, GGUF). `load_backend` picks the
backend from the folder (an MLX export gets MLX, a GGUF export llama.cpp, anything else torch) and
resolves an adapter folder to its base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..artifacts import ArtifactError, is_gguf_export, is_mlx_export, resolve_model
from ..artifacts import frame_layout as recorded_frame_layout
from ..errors import first_line
from ..scoring import ButtonScores, Generation, ScoreItem

BACKENDS = ("auto", "torch", "mlx", "gguf")


class BackendError(RuntimeError):
    """A backend cannot be created or cannot do what was asked; the message is one line for people."""


class Backend(Protocol):
    name: str  # what runs the model: "torch" | "mlx" | "gguf"
    kind: str  # what the folder is (artifacts.KINDS)
    model_version: str
    frame_layout: str
    supports_features: bool  # per-frame vision features (encode_frames / score(features=...))
    batched_scoring: bool  # score_batch runs the batch as one model pass (else item by item)
    base_model: str | None
    adapter_path: str | None

    def fit_context(self, context: str, question: str) -> str: ...

    def encode_frames(self, images: list[Image.Image]) -> list[Any]: ...

    def score(
        self, frames: list[Image.Image], context: str, question: str, features: list[Any] | None = None
    ) -> ButtonScores: ...

    def score_batch(self, items: list[ScoreItem]) -> list[ButtonScores]: ...

    def generate(self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96) -> str: ...

    def generate_batch(
        self, items: list[tuple[list[Image.Image], str, str]], max_new_tokens: int = 96
    ) -> list[str]: ...

    def generate_details(
        self, frames: list[Image.Image], context: str, question: str, max_new_tokens: int = 96
    ) -> Generation: ...

    def prompt_tokens(self, context: str, question: str) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def frame_input(self) -> tuple[tuple[int, int], int] | None: ...


def model_version(model_path: str, adapter_path: str | None = None) -> str:
    """`<folder name>-<12 hex>` from the configs and weight file names/sizes (cheap, no weight hashing)."""
    digest = hashlib.sha256()
    for folder in (model_path, adapter_path):
        if not folder:
            continue
        path = Path(folder)
        digest.update(str(path.name).encode())
        for name in ("config.json", "adapter_config.json"):
            if (path / name).is_file():
                digest.update((path / name).read_bytes())
        for weights in sorted([*path.glob("*.safetensors"), *path.glob("*.npz"), *path.glob("*.gguf")]):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{Path(adapter_path or model_path).name}-{digest.hexdigest()[:12]}"


def choose_backend(model: str, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (use one of: {', '.join(BACKENDS)})")
    if backend == "auto":
        return "mlx" if is_mlx_export(model) else "gguf" if is_gguf_export(model) else "torch"
    if backend != "mlx" and is_mlx_export(model):
        raise BackendError(f"{model} is an MLX export (use --backend mlx)")
    if backend != "gguf" and is_gguf_export(model):
        raise BackendError(f"{model} is a GGUF export (use --backend gguf)")
    if backend == "gguf" and not is_gguf_export(model):
        raise BackendError(f"{model} is not a GGUF export (make one with scripts/convert_to_gguf.py)")
    return backend


def load_backend(
    model: str,
    adapter_path: str | None = None,
    *,
    backend: str = "auto",
    frame_layout: str | None = None,
    default_frame_layout: str = "images",
    max_seq_length: int = 2048,
    precision: str = "no",
    token: str | None = None,
    version: str | None = None,
) -> Backend:
    """Load any model folder or hub id. An adapter folder loads its base + the adapter. The frame
    layout: `frame_layout` if given, else what the model's folders record, else `default_frame_layout`
    (the FRAME_LAYOUT setting). Raises BackendError (one line)."""
    from ..modeling import ModelLoadError

    name = choose_backend(model, backend)
    try:
        ref = resolve_model(model, adapter_path)
    except ArtifactError as exc:
        raise BackendError(str(exc)) from None
    layout = frame_layout or recorded_frame_layout(ref.adapter, ref.model) or default_frame_layout
    try:
        if name == "mlx":
            if ref.adapter:
                raise BackendError("an adapter cannot be put on an MLX export (merge the adapter, then export)")
            from .mlx_backend import MlxBackend

            return MlxBackend(ref.model, frame_layout=layout, max_seq_length=max_seq_length, version=version)
        if name == "gguf":
            if ref.adapter:
                raise BackendError("an adapter cannot be put on a GGUF export (merge the adapter, then export)")
            from .gguf_backend import GgufBackend

            return GgufBackend(ref.model, frame_layout=layout, max_seq_length=max_seq_length, version=version)
        from .torch_backend import TorchBackend

        return TorchBackend(
            ref.model,
            ref.adapter,
            kind=ref.kind,
            precision=precision,
            max_seq_length=max_seq_length,
            frame_layout=layout,
            token=token,
            version=version,
        )
    except BackendError:
        raise
    except ModelLoadError as exc:  # already one line (e.g. a family this install cannot run)
        raise BackendError(str(exc)) from None
    except ImportError as exc:
        raise BackendError(
            f"the {name} backend is not available ({first_line(exc)}); install it or use another --backend"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # e.g. an adapter that does not fit its base
        raise BackendError(f"cannot load {ref.adapter or ref.model}: {first_line(exc)}") from None


class ScorerBackend:
    """The Backend interface over a `scoring.ButtonScorer`-shaped object (torch `ButtonScorer`,
    `MlxButtonScorer`): per-frame vision features come from `image_features`."""

    name = "scorer"

    def __init__(
        self, scorer, *, kind: str, frame_layout: str, version: str, stack, base_model=None, adapter_path=None
    ):
        self.scorer = scorer
        self.collator = scorer.collator
        self.kind = kind
        self.frame_layout = frame_layout
        self.model_version = version
        self.base_model, self.adapter_path = base_model, adapter_path
        self._stack = stack
        # A 2x2 grid image depends on all 4 frames: only separate images have per-frame features.
        self.supports_features = frame_layout == "images"
        self.batched_scoring = getattr(scorer, "batched_scoring", True)
        # Tokenizer results, oldest first: an agent's requests repeat their context and question, and
        # tokenizing on every request would cost the server a sizeable share of a small model's time.
        self._tokenized: dict[tuple, Any] = {}

    def _cached(self, key: tuple, compute):
        """compute(), remembered under `key` (256 kept; an exception is not remembered)."""
        if key not in self._tokenized:
            self._tokenized[key] = compute()
            if len(self._tokenized) > 256:
                self._tokenized.pop(next(iter(self._tokenized)))
        return self._tokenized[key]

    def fit_context(self, context: str, question: str) -> str:
        """Cached: an agent's requests repeat their context and question (a rejection is not cached)."""
        from ..dataset import BUTTONS
        from ..scoring import answer_prefix

        longest = max((answer_prefix(b) for b in BUTTONS), key=len)
        return self._cached(
            ("fit", context, question), lambda: self.collator.fit_context(context, question, longest, "request")[0]
        )

    def encode_frames(self, images: list[Image.Image]) -> list[Any]:
        features = self.scorer.image_features(images)
        return [features[i] for i in range(len(images))]

    def score(self, frames, context, question, features=None) -> ButtonScores:
        return self.score_batch([ScoreItem(frames, context, question, features)])[0]

    def score_batch(self, items: list[ScoreItem]) -> list[ButtonScores]:
        """Items' `features` are per-frame lists (as `encode_frames` gives them); the scorer takes them stacked."""
        stacked = [
            item
            if item.features is None
            else ScoreItem(item.frames, item.context, item.question, self._stack(item.features))
            for item in items
        ]
        return self.scorer.score_batch(stacked)

    def generate(self, frames, context, question, max_new_tokens: int = 96) -> str:
        return self.scorer.generate(frames, context, question, max_new_tokens=max_new_tokens)

    def generate_batch(self, items, max_new_tokens: int = 96) -> list[str]:
        return self.scorer.generate_batch(items, max_new_tokens=max_new_tokens)

    def generate_details(self, frames, context, question, max_new_tokens: int = 96) -> Generation:
        return self.scorer.generate_batch_details([(frames, context, question)], max_new_tokens=max_new_tokens)[0]

    def prompt_tokens(self, context: str, question: str) -> int:
        return self._cached(
            ("prompt", context, question),
            lambda: len(self.collator.expanded_ids(self.collator.prompt_text(context, question))),
        )

    def count_tokens(self, text: str) -> int:
        # Only the 8 answers a score request sends back are counted here, so the cache stays small.
        return self._cached(("count", text), lambda: len(self.tokenize(text)))

    def tokenize(self, text: str) -> list[int]:
        return self.collator.tokenizer(text, add_special_tokens=False)["input_ids"]

    def frame_input(self) -> tuple[tuple[int, int], int] | None:
        """((width, height), resample) the image processor resizes every image to; None when it keeps
        sizes or crops (pan and scan). With separate frames a larger frame resized to it first gives the
        very same pixels; with the 2x2 grid (whose tiles end up half that size) it is a close bound."""
        proc = self.collator.processor.image_processor
        size = getattr(proc, "size", None)
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if not getattr(proc, "do_resize", True) or getattr(proc, "do_pan_and_scan", False) or not height or not width:
            return None
        return (int(width), int(height)), int(getattr(proc, "resample", Image.Resampling.BILINEAR))
