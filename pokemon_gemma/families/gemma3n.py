"""Gemma 3n (`gemma3n`, Gemma3nForConditionalGeneration; google/gemma-3n-E2B-it, E4B-it).

Prompt as Gemma 3 (`<end_of_turn>`; each image `<image_soft_token>` in the template, expanded to 256
soft tokens); `token_type_ids` are returned but images attend causally. The vision tower is timm's
MobileNetV5, and timm needs torchvision: the only torchvision on PyPI for this project's CPU torch
(2.13) is a CUDA build that breaks every image model (FINDINGS in the families research), so Gemma 3n
runs only on installs with a matching torch + torchvision (e.g. torch 2.14.1 + torchvision 0.29.1,
the GPU install). Its vision tower is all Conv2d: `language+vision` LoRA targets the convolutions.
mlx-vlm 0.7.10 cannot export it (hard-coded vision tower, missing text-embedding scale, KV-shared
layers differ).
"""

from __future__ import annotations

from .base import LANGUAGE_LORA, Family, FamilyError

_VISION = (
    r"model\.vision_tower\.timm_model\.blocks\.\d+\.\d+\."
    r"(attn\.(query|key|value|output)\.proj|pw_exp\.conv|pw_proj\.conv)"
)

UNAVAILABLE = (
    "Gemma 3n needs timm and a torchvision built for the installed torch ({why}); install them on a GPU "
    "machine (e.g. pip install torch==2.14.1 torchvision==0.29.1 timm) - CPU-only installs of this project "
    "support Gemma 3 and Gemma 4"
)


class Gemma3n(Family):
    name = "gemma3n"
    display = "Gemma 3n"
    model_type = "gemma3n"
    processor_class = "Gemma3nProcessor"
    end_of_turn = "<end_of_turn>"
    token_type_key = "token_type_ids"
    lora_targets = {
        "language": LANGUAGE_LORA,
        "language+vision": f"({LANGUAGE_LORA}|{_VISION})",
        "all-linear": "all-linear",
    }
    lora_exclude = r"model\.(audio_tower|embed_audio)\..*"
    qlora_skip_modules = (
        "model.vision_tower",
        "model.embed_vision",
        "model.audio_tower",
        "model.embed_audio",
        "lm_head",
    )
    mlx_unsupported = (
        "mlx-vlm 0.7.10 cannot export Gemma 3n (hard-coded MobileNetV5 vision tower, text embeddings without "
        "the sqrt(hidden) scale, KV-shared layers differ from transformers)"
    )

    def check_available(self) -> None:
        try:
            import timm  # noqa: F401
            import torchvision  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - ImportError, or RuntimeError from a CUDA-only torchvision
            raise FamilyError(
                UNAVAILABLE.format(why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            ) from None

    def image_placeholder(self, processor) -> str:
        return processor.image_token

    def image_sequence(self, processor, n_tokens: int) -> str:
        return processor.full_image_sequence

    def build_tiny(self, output_dir, seed: int = 0, **kwargs):
        self.check_available()
        from ..tiny_gemma3n import build_tiny_model

        return build_tiny_model(output_dir, seed=seed, **kwargs)
