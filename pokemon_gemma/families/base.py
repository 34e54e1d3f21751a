"""The interface every model family implements: the few things that differ between Gemma 3, Gemma 4
and Gemma 3n. Stages call these hooks; none of them asks which family it has.

A family says:
- `end_of_turn`, `image_placeholder`, `image_sequence`: the chat prompt with 4 images and how the
  processor expands each image into its soft tokens;
- `tokens_per_image` (and `image_budgets` / `set_image_tokens`): soft tokens per image, and the
  budget setting where the family has one (Gemma 4: 70/140/280/560/1120);
- `token_type_key`, `images_bidirectional`: which attention the images get and the input key that
  carries the image-token types;
- `pixel_inputs`, `image_features`, `features_input`: what the vision side takes (Gemma 4 also
  `image_position_ids`), its projected features, and how they go back into the model (the scorer and
  the server's frame cache reuse them);
- `lora_targets`, `lora_exclude`, `qlora_skip_modules`: LoRA target regexes for `language`,
  `language+vision`, `all-linear`, and the modules QLoRA keeps unquantised (full module names);
- `mlx_fixes` / `mlx_unsupported`: what mlx-vlm needs before it converts the family, or why it cannot;
- `load_processor`, `build_tiny`, `check_available`: loading, the tiny random model, extra dependencies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LORA_TARGET_NAMES = ("language", "language+vision", "all-linear")

# The language model's attention and MLP projections: the same names in every Gemma family.
LANGUAGE_LORA = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class FamilyError(ValueError):
    """A family cannot do what was asked (unknown family, missing dependency, unsupported setting);
    the message is one line for people and says what to do."""


class Family:
    name = ""  # "gemma3"
    display = ""  # "Gemma 3"
    model_type = ""  # config.json model_type
    processor_class = ""  # processor_config.json processor_class
    end_of_turn = "<end_of_turn>"  # closes a turn; labelled with the answer
    token_type_key = "token_type_ids"  # the forward's key for image-token types
    image_budgets: tuple[int, ...] = ()  # allowed --image_tokens values ((): fixed per image)
    lora_targets: dict[str, str] = {}
    lora_exclude: str | None = None  # regex of modules all-linear must leave alone
    qlora_skip_modules: tuple[str, ...] = ()
    mlx_fixes: tuple[str, ...] = ()  # names in export.mlx_fixes, applied when needed
    mlx_unsupported: str | None = None  # why mlx-vlm cannot export this family (None: it can)
    fast_prompt_masks = False  # scoring builds the prompt pass's 4-D masks itself (Gemma 3's mask rules)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def mlx_unsupported_reason(self, config: dict) -> str | None:
        """Why mlx-vlm cannot export the model with this config.json (None: it can)."""
        return self.mlx_unsupported

    # --- dependencies and loading
    def check_available(self) -> None:
        """Raise FamilyError when this install cannot load the family's models."""

    def load_processor(self, model_name: str, **kwargs):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_name, **kwargs)

    def set_image_tokens(self, processor, budget: int) -> None:
        """Apply an --image_tokens budget (0 = the model's own)."""
        if budget:
            raise FamilyError(
                f"--image_tokens {budget}: {self.display} has a fixed {self.max_tokens_per_image(processor)} soft "
                "tokens per image (use 0; budgets exist for Gemma 4)"
            )

    def image_tokens_setting(self, processor) -> int | None:
        """The processor's current budget, None where the family has none."""
        return None

    # --- prompt and image tokens
    def image_placeholder(self, processor) -> str:
        """The text the chat template writes for one image (the processor expands it)."""
        return processor.boi_token

    def image_sequence(self, processor, n_tokens: int) -> str:
        """What one image placeholder becomes with `n_tokens` soft tokens."""
        tok = processor.tokenizer
        return f"\n\n{processor.boi_token}{tok.image_token * n_tokens}{tok.eoi_token}\n\n"

    def max_tokens_per_image(self, processor) -> int:
        return int(processor.image_seq_length)

    def tokens_per_image(self, processor, size: tuple[int, int] | None = None) -> int:
        """Soft tokens of an image of `size` (width, height); None: the most any image gets."""
        return self.max_tokens_per_image(processor)

    # --- model inputs
    def images_bidirectional(self, config) -> bool:
        """Whether image tokens attend to each other within an image when `token_type_key` is passed
        (`config`: the model's config object or its config.json as a dict)."""
        return False

    def pixel_inputs(self, processor, images: list, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(dtype)}

    def image_features(self, model, pixel_inputs: dict[str, torch.Tensor]) -> Any:
        """Projected vision features (n_images, tokens, hidden) of the inner *Model (under PEFT/DDP)."""
        return model.get_image_features(pixel_inputs["pixel_values"], return_dict=True).pooler_output

    def features_input(self, features, device) -> Any:
        """`image_features` output (or a list of per-image features) as the model takes it back through
        `mm_encoder_outputs`: Gemma 3 one (n_images, tokens, hidden) tensor."""
        if isinstance(features, (list, tuple)):
            features = torch.stack([f.to(device) for f in features])
        return features.to(device)

    # --- fine-tuning
    def lora_target(self, targets: str) -> str:
        if targets not in self.lora_targets:
            raise FamilyError(f"--lora_targets {targets!r}: not one of {', '.join(self.lora_targets)}")
        return self.lora_targets[targets]

    # --- tiny models
    def build_tiny(self, output_dir: str | Path, seed: int = 0, **kwargs) -> Path:
        raise NotImplementedError
