"""Gemma 3 (`gemma3`, Gemma3ForConditionalGeneration): 256 soft tokens per image (the tiny model 16),
bidirectional attention inside each image through `token_type_ids`, SigLIP vision tower."""

from __future__ import annotations

from pathlib import Path

from .base import LANGUAGE_LORA, Family

_VISION = r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"


class Gemma3(Family):
    name = "gemma3"
    fast_prompt_masks = True
    display = "Gemma 3"
    model_type = "gemma3"
    processor_class = "Gemma3Processor"
    end_of_turn = "<end_of_turn>"
    token_type_key = "token_type_ids"
    lora_targets = {
        "language": LANGUAGE_LORA,
        "language+vision": f"({LANGUAGE_LORA}|{_VISION})",
        "all-linear": "all-linear",
    }
    # Full module names: transformers matches these from the start of the name (a bare
    # "vision_tower" matched nothing, and QLoRA quantised the vision tower).
    qlora_skip_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    mlx_fixes = (
        "fix_mm_tokens_in_text_config",
        "fix_top_level_hidden_size",
        "fix_rope_parameters",
        "fix_vision_tower_prefix",
    )

    def image_sequence(self, processor, n_tokens: int) -> str:
        return processor.full_image_sequence  # "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n"

    def images_bidirectional(self, config) -> bool:
        # Gemma 3 builds its "same image" attention blocks from token_type_ids on every layer.
        return True

    def build_tiny(self, output_dir: str | Path, seed: int = 0, **kwargs) -> Path:
        from ..tiny import build_tiny_model

        return build_tiny_model(output_dir, seed=seed, **kwargs)
