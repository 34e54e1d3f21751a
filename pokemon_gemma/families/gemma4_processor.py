"""Gemma 4's processor without torchvision.

transformers 5.23's `Gemma4Processor` takes a `Gemma4VideoProcessor`, which needs torchvision; without
it neither `Gemma4Processor(...)` nor `AutoProcessor.from_pretrained` loads (ImportError), for a hub
folder as much as for the tiny model. `Gemma4ImageTextProcessor` is the same processor minus video:
ProcessorMixin derives the sub-processors from `__init__`'s signature, so leaving `video_processor`
out makes save/load skip it. Imported lazily: importing the families does not import transformers.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Gemma4Processor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available


class Gemma4ImageTextProcessor(Gemma4Processor):
    """Gemma4Processor for images, text and audio; no video processor (so no torchvision)."""

    def __init__(
        self,
        feature_extractor,
        image_processor,
        tokenizer,
        chat_template=None,
        image_seq_length: int = 280,
        audio_seq_length: int = 750,
        audio_ms_per_token: int = 40,
        **kwargs,
    ):
        # Gemma4Processor.__init__'s attributes, without the video processor.
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.image_token_id
        self.boi_token = tokenizer.boi_token
        self.eoi_token = tokenizer.eoi_token
        self.image_token = tokenizer.image_token
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|video|>"]})
        self.video_token = "<|video|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.audio_seq_length = audio_seq_length
        self.audio_ms_per_token = audio_ms_per_token
        self.audio_token_id = getattr(tokenizer, "audio_token_id", None)
        self.audio_token = getattr(tokenizer, "audio_token", None)
        self.boa_token = getattr(tokenizer, "boa_token", None)
        self.eoa_token = getattr(tokenizer, "eoa_token", None)
        ProcessorMixin.__init__(
            self,
            feature_extractor=feature_extractor,
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            **kwargs,
        )

    def to_dict(self) -> dict:
        # Saved folders name the hub's class, so they load as a Gemma4Processor wherever torchvision works.
        out = super().to_dict()
        out["processor_class"] = "Gemma4Processor"
        return out


def load_processor(model_name: str | Path, **kwargs):
    """AutoProcessor where torchvision imports (and the folder has a video processor section: one saved
    without torchvision has none), else the same processor without video."""
    if is_torchvision_available():
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(model_name, **kwargs)
        except OSError:
            pass
    return Gemma4ImageTextProcessor.from_pretrained(model_name, **kwargs)
