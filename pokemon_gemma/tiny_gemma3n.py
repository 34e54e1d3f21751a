"""Build a tiny random Gemma 3n vision-language model that loads like a real one.

Needs timm (MobileNetV5 vision tower) and so torchvision: GPU installs only on this project (see
families/gemma3n.py). The folder holds a random `Gemma3nForConditionalGeneration` (text: per-layer
embeddings, AltUp, LAuReL, activation sparsity, KV sharing; vision: a shrunken MobileNetV5 with the
multi-scale fusion adapter, 16 soft tokens per 64x64 image; audio: a one-layer conformer, which
Gemma 3n always builds), a BPE tokenizer whose vision/audio tokens sit at the offsets the model embeds
them from, the Gemma 3n chat template, and a `Gemma3nProcessor`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .fileio import make_readable
from .tiny import GEMMA3_CHAT_TEMPLATE

# Text-vocabulary special tokens (Gemma ids for the first three: pad 0, eos 1, bos 2). On the hub
# <start_of_image>=255999 and <start_of_audio>=256000 are text tokens; the vision block starts at
# 262144 (<end_of_image>=262144, <image_soft_token>=262145) and the audio block at 262272
# (<end_of_audio>=262272, <audio_soft_token>=262273); 128 ids each.
TEXT_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<start_of_audio>",
]
MM_VOCAB = 8  # ids per modality block (the hub's is 128)

# The hub's Gemma 3n chat template: Gemma 3's, with images as <image_soft_token> and audio as
# <audio_soft_token> (the processor expands each into "\n\n<start_of_image>" + 256 soft tokens +
# "<end_of_image>\n\n").
_GEMMA3_IMAGE_ITEM = "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
if _GEMMA3_IMAGE_ITEM not in GEMMA3_CHAT_TEMPLATE:  # the derivation below would silently change nothing
    raise ImportError("tiny.GEMMA3_CHAT_TEMPLATE no longer writes images as <start_of_image>")
GEMMA3N_CHAT_TEMPLATE = GEMMA3_CHAT_TEMPLATE.replace(
    _GEMMA3_IMAGE_ITEM,
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}",
)

# timm arguments for a small MobileNetV5: the `_base` block layout with 1/32 of its channels, a
# 64-channel fusion adapter (the encoder variant hard-codes 2048) pooled to 4x4 = 16 soft tokens.
# The hub's is `mobilenetv5_300m_enc` (294 M parameters, 2048 channels, 16x16 = 256 tokens).
TINY_VISION_ARCH = "mobilenetv5_base"
TINY_VISION_ARGS = {"channel_multiplier": 0.03125, "num_features": 64, "msfa_output_resolution": 4}


def _corpus() -> list[str]:
    from .tiny import _corpus as project_corpus

    return project_corpus() + ["user\n", "model\n"]


def build_tokenizer(vocab_size: int = 1024):
    """BPE over the corpus with the text specials; then the vision and audio id blocks appended."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from .tiny import train_bpe

    tok = train_bpe(TEXT_SPECIAL_TOKENS, _corpus(), vocab_size)
    vision = ["<end_of_image>", "<image_soft_token>"] + [f"<unused_vision_{i}>" for i in range(MM_VOCAB - 2)]
    audio = ["<end_of_audio>", "<audio_soft_token>"] + [f"<unused_audio_{i}>" for i in range(MM_VOCAB - 2)]
    tok.add_special_tokens([AddedToken(t, special=True) for t in vision + audio])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "boa_token": "<start_of_audio>",
            "eoa_token": "<end_of_audio>",
            "audio_token": "<audio_soft_token>",
        },
        padding_side="right",
        chat_template=GEMMA3N_CHAT_TEMPLATE,
        model_max_length=8192,
    )


def tiny_config(
    tokenizer,
    *,
    hidden_size: int = 64,
    text_layers: int = 6,
    kv_shared_layers: int = 2,
    vision_arch: str = TINY_VISION_ARCH,
    vision_args: dict | None = None,
    soft_tokens: int = 16,
    initializer_range: float = 0.2,
    sparse_layers: int = 2,
):
    from transformers import Gemma3nConfig

    ids = tokenizer.convert_tokens_to_ids
    vision_offset = ids("<end_of_image>")
    audio_offset = ids("<end_of_audio>")
    assert ids("<image_soft_token>") == vision_offset + 1 and audio_offset == vision_offset + MM_VOCAB
    vision_args = dict(TINY_VISION_ARGS if vision_args is None else vision_args)
    vision_hidden = vision_args.get("num_features", 2048)
    layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(text_layers)]
    layer_types[-1] = "full_attention"
    text_config = dict(
        vocab_size=audio_offset + MM_VOCAB,
        vocab_size_per_layer_input=vision_offset,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=kv_shared_layers,
        laurel_rank=8,
        layer_types=layer_types,
        sliding_window=512,
        max_position_embeddings=4096,
        activation_sparsity_pattern=[0.95] * sparse_layers + [0.0] * (text_layers - sparse_layers),
        initializer_range=initializer_range,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision_config = dict(
        architecture=vision_arch,
        model_args=vision_args,
        hidden_size=vision_hidden,
        vocab_size=MM_VOCAB,
        vocab_offset=vision_offset,
        do_pooling=False,
    )
    audio_config = dict(
        vocab_size=MM_VOCAB,
        vocab_offset=audio_offset,
        hidden_size=32,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=[8, 4],
    )
    return Gemma3nConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        vision_soft_tokens_per_image=soft_tokens,
        boi_token_id=ids("<start_of_image>"),
        eoi_token_id=vision_offset,
        image_token_id=ids("<image_soft_token>"),
        boa_token_id=ids("<start_of_audio>"),
        eoa_token_id=audio_offset,
        audio_token_id=ids("<audio_soft_token>"),
        initializer_range=initializer_range,
    )


def build_processor(tokenizer, image_size: int = 64, soft_tokens: int = 16):
    from transformers import Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    # MobileNetV5 takes pixels in [0, 1] (timm cfg mean 0, std 1), resized to a square.
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_normalize=False, resample=2
    )
    return Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3N_CHAT_TEMPLATE,
        image_seq_length=soft_tokens,
    )


def build_tiny_model(
    output_dir: str | Path,
    seed: int = 0,
    *,
    image_size: int = 64,
    vision_arch: str = TINY_VISION_ARCH,
    vision_args: dict | None = None,
    **config_kwargs,
) -> Path:
    """Write a tiny random Gemma 3n + tokenizer + processor to `output_dir` and return the path."""
    from transformers import Gemma3nForConditionalGeneration, GenerationConfig

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    args = dict(TINY_VISION_ARGS if vision_args is None else vision_args)
    soft_tokens = args.get("msfa_output_resolution", 16) ** 2
    config = tiny_config(tokenizer, vision_arch=vision_arch, vision_args=args, soft_tokens=soft_tokens, **config_kwargs)
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=[1, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        do_sample=False,
    )
    model.save_pretrained(output_dir)
    build_processor(tokenizer, image_size=image_size, soft_tokens=soft_tokens).save_pretrained(output_dir)
    make_readable(output_dir)  # safetensors writes 0600
    return output_dir
