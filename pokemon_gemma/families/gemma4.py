"""Gemma 4 (`gemma4`, Gemma4ForConditionalGeneration; E2B/E4B, 26B-A4B, 31B).

Differences from Gemma 3 that stages see: turns end with `<turn|>`; each image is one `<|image|>` in
the template, expanded to `<|image>` + n x `<|image|>` + `<image|>` where n depends on the image's
aspect ratio and the budget (70/140/280/560/1120 soft tokens); pixels travel with
`image_position_ids`; image-token types go in `mm_token_type_ids` (a `token_type_ids` key is silently
ignored). Images attend bidirectionally only where `use_bidirectional_attention == "vision"`
(26B/31B), on sliding layers. The vision linears are `Gemma4ClippableLinear` wrappers PEFT cannot
wrap: LoRA targets their inner `.linear`.
"""

from __future__ import annotations

import torch

from .base import LANGUAGE_LORA, Family, FamilyError

_VISION = r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.linear"


class Gemma4(Family):
    name = "gemma4"
    display = "Gemma 4"
    model_type = "gemma4"
    processor_class = "Gemma4Processor"
    end_of_turn = "<turn|>"
    token_type_key = "mm_token_type_ids"
    image_budgets = (70, 140, 280, 560, 1120)
    lora_targets = {
        "language": LANGUAGE_LORA,
        "language+vision": f"({LANGUAGE_LORA}|{_VISION})",
        "all-linear": "all-linear",
    }
    # all-linear would also wrap the audio tower, whose adapters get zero gradients from image prompts.
    lora_exclude = r"model\.(audio_tower|embed_audio)\..*"
    qlora_skip_modules = (
        "model.vision_tower",
        "model.embed_vision",
        "model.audio_tower",
        "model.embed_audio",
        "lm_head",
    )
    mlx_fixes = ("fix_global_head_dim",)

    def load_processor(self, model_name: str, **kwargs):
        from .gemma4_processor import load_processor

        return load_processor(model_name, **kwargs)

    def set_image_tokens(self, processor, budget: int) -> None:
        if not budget:
            return
        if budget not in self.image_budgets:
            raise FamilyError(
                f"--image_tokens {budget}: Gemma 4 takes one of {', '.join(map(str, self.image_budgets))}"
            )
        processor.image_processor.max_soft_tokens = budget

    def image_tokens_setting(self, processor) -> int | None:
        return int(processor.image_processor.max_soft_tokens)

    def image_placeholder(self, processor) -> str:
        return processor.image_token

    def image_sequence(self, processor, n_tokens: int) -> str:
        return f"{processor.boi_token}{processor.image_token * n_tokens}{processor.eoi_token}"

    def max_tokens_per_image(self, processor) -> int:
        return int(processor.image_processor.max_soft_tokens)

    def tokens_per_image(self, processor, size: tuple[int, int] | None = None) -> int:
        """What Gemma4ImageProcessor gives an image of `size`: an aspect-preserving resize to the most
        patches within the budget, sides multiples of pooling kernel x patch, one token per k x k patches."""
        if size is None:
            return self.max_tokens_per_image(processor)
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

        ip = processor.image_processor
        k, patch = ip.pooling_kernel_size, ip.patch_size
        width, height = size
        h, w = get_aspect_ratio_preserving_size(height, width, patch, ip.max_soft_tokens * k * k, k)
        return (h // patch) * (w // patch) // (k * k)

    def images_bidirectional(self, config) -> bool:
        if isinstance(config, dict):  # a config.json read as is
            setting = (config.get("text_config") or {}).get("use_bidirectional_attention")
        else:
            setting = getattr(config.get_text_config(), "use_bidirectional_attention", None)
        return setting == "vision"

    def mlx_unsupported_reason(self, config: dict) -> str | None:
        # mlx-vlm 0.7.10 overlays the image blocks on full-attention layers too: the export would not match.
        if self.images_bidirectional(config):
            return (
                "mlx-vlm 0.7.10 makes images attend bidirectionally on every layer, this Gemma 4 "
                "(use_bidirectional_attention='vision') only on sliding layers: its MLX export could not match PyTorch"
            )
        return super().mlx_unsupported_reason(config)

    def pixel_inputs(self, processor, images: list, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(dtype), "image_position_ids": out["image_position_ids"]}

    def image_features(self, model, pixel_inputs: dict[str, torch.Tensor]):
        # A tuple of per-image (n_i, hidden) tensors; mm_encoder_outputs takes it back as is.
        out = model.get_image_features(
            pixel_inputs["pixel_values"], pixel_inputs["image_position_ids"], return_dict=True
        )
        return out.pooler_output

    def features_input(self, features, device):
        # Gemma 4 concatenates a tuple of per-image (tokens, hidden) tensors (a stacked tensor is a TypeError).
        return tuple(f.to(device) for f in features)

    def build_tiny(self, output_dir, seed: int = 0, **kwargs):
        from ..tiny_gemma4 import build_tiny_model

        return build_tiny_model(output_dir, seed=seed, **kwargs)
