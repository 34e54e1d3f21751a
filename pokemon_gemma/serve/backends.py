"""Model backends behind one small interface, so the app does not care what runs the model.

A backend scores the 8 answers for 4 frames (`score`) or generates the answer text (`generate`).
Backends that can split off the vision tower (`supports_features`) also expose `encode_frames`,
which the server batches across requests and caches per frame.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..dataset import BUTTONS

log = logging.getLogger(__name__)

BACKENDS = ("torch", "mlx")


class BackendError(RuntimeError):
    """The backend cannot be created; the message says why and what to do."""


class Backend(Protocol):
    name: str
    model_version: str
    supports_features: bool

    def fit_context(self, context: str, question: str) -> str: ...

    def encode_frames(self, images: list[Image.Image]) -> list[Any]: ...

    def score(
        self, images: list[Image.Image], context: str, question: str, features: list[Any] | None = None
    ) -> dict[str, float]: ...

    def generate(self, images: list[Image.Image], context: str, question: str, max_new_tokens: int) -> str: ...


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
        for weights in sorted(list(path.glob("*.safetensors")) + list(path.glob("*.npz"))):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{Path(adapter_path or model_path).name}-{digest.hexdigest()[:12]}"


def probabilities(logprobs: dict[str, float]) -> dict[str, float]:
    from ..scoring import ButtonScores

    return ButtonScores(dict(logprobs)).probabilities


class ScorerBackend:
    """A backend over a `scoring.ButtonScorer`-shaped object (torch `ButtonScorer` or `MlxButtonScorer`):
    per-frame vision features come from `image_features`, and `score(features=...)` skips the tower."""

    name = "scorer"

    def __init__(self, scorer, frame_layout: str, version: str, stack):
        self.scorer = scorer
        self.collator = scorer.collator
        self._stack = stack
        # A 2x2 grid image depends on all 4 frames: only separate images have per-frame features.
        self.supports_features = frame_layout == "images"
        self.model_version = version

    def fit_context(self, context: str, question: str) -> str:
        from ..scoring import answer_prefix

        longest = max((answer_prefix(b) for b in BUTTONS), key=len)
        return self.collator.fit_context(context, question, longest, "request")[0]

    def encode_frames(self, images: list[Image.Image]) -> list[Any]:
        features = self.scorer.image_features(images)
        return [features[i] for i in range(len(images))]

    def score(self, images, context, question, features=None) -> dict[str, float]:
        stacked = self._stack(features) if features is not None else None
        return {b: float(v) for b, v in self.scorer.score(images, context, question, features=stacked).logprobs.items()}

    def generate(self, images, context, question, max_new_tokens) -> str:
        return self.scorer.generate(images, context, question, max_new_tokens=max_new_tokens)


class TorchBackend(ScorerBackend):
    """transformers + peft on CPU/CUDA/MPS, through the shared `ButtonScorer`."""

    name = "torch"

    def __init__(
        self,
        model_path: str,
        adapter_path: str | None = None,
        *,
        precision: str = "no",
        max_seq_length: int = 2048,
        frame_layout: str = "images",
        version: str | None = None,
    ):
        import torch

        from ..collate import Collator
        from ..modeling import load_for_inference
        from ..scoring import ButtonScorer

        model, processor = load_for_inference(model_path, adapter_path, precision=precision)
        scorer = ButtonScorer(model, Collator(processor, max_seq_length=max_seq_length, frame_layout=frame_layout))
        super().__init__(scorer, frame_layout, version or model_version(model_path, adapter_path), torch.stack)


class MlxBackend(ScorerBackend):
    """Apple MLX (mlx-vlm) on an exported MLX folder, through `mlx_backend.MlxButtonScorer`."""

    name = "mlx"

    def __init__(
        self, mlx_dir: str, *, max_seq_length: int = 2048, frame_layout: str = "images", version: str | None = None
    ):
        try:
            import mlx.core as mx

            from ..mlx_backend import MlxButtonScorer
        except ImportError as exc:
            raise BackendError(
                f"MLX backend unavailable ({exc}); install mlx and mlx-vlm or use --backend torch"
            ) from None
        scorer = MlxButtonScorer(mlx_dir, frame_layout=frame_layout, max_seq_length=max_seq_length)
        super().__init__(scorer, frame_layout, version or model_version(mlx_dir), mx.stack)


def create_backend(
    kind: str,
    model_path: str,
    adapter_path: str | None = None,
    *,
    precision: str = "no",
    max_seq_length: int = 2048,
    frame_layout: str = "images",
    version: str | None = None,
) -> Backend:
    """Load a backend; raises ModelLoadError/BackendError with a one-line reason."""
    if kind == "torch":
        return TorchBackend(
            model_path,
            adapter_path,
            precision=precision,
            max_seq_length=max_seq_length,
            frame_layout=frame_layout,
            version=version,
        )
    if kind == "mlx":
        if adapter_path:
            raise BackendError("--adapter_path is not supported with --backend mlx (export a merged MLX folder)")
        if not Path(model_path).is_dir():
            raise BackendError(f"{model_path}: MLX model folder not found (export one with the MLX export stage)")
        try:
            return MlxBackend(model_path, max_seq_length=max_seq_length, frame_layout=frame_layout, version=version)
        except (OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, BackendError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"cannot load MLX export {model_path}: {first}") from None
    raise BackendError(f"unknown backend {kind!r} (use one of: {', '.join(BACKENDS)})")
