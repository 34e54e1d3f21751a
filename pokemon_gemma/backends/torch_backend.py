"""transformers + peft on CPU/CUDA/MPS, through the shared `scoring.ButtonScorer`."""

from __future__ import annotations

from . import ScorerBackend, model_version


class TorchBackend(ScorerBackend):
    name = "torch"

    def __init__(
        self,
        model_path: str,
        adapter_path: str | None = None,
        *,
        kind: str = "base",
        precision: str = "no",
        max_seq_length: int = 2048,
        frame_layout: str = "images",
        token: str | None = None,
        version: str | None = None,
    ):
        import torch

        from ..collate import Collator
        from ..modeling import load_for_inference
        from ..scoring import ButtonScorer

        model, processor = load_for_inference(model_path, adapter_path, precision=precision, token=token)
        scorer = ButtonScorer(model, Collator(processor, max_seq_length=max_seq_length, frame_layout=frame_layout))
        super().__init__(
            scorer,
            kind=kind,
            frame_layout=frame_layout,
            version=version or model_version(model_path, adapter_path),
            stack=torch.stack,
            base_model=model_path,
            adapter_path=adapter_path,
        )
