"""Build a tiny random Gemma 4 vision-language model that loads like a real one.

The folder holds `config.json` + safetensors weights of a random `Gemma4ForConditionalGeneration`
shaped like E2B at toy size (per-layer embeddings, KV sharing, sliding + global layers with a larger
global head dim, Gemma 4 vision tower with 2-D position table, pooling and clippable linears,
`embed_vision`, optional tiny audio tower), a fast BPE tokenizer with Gemma 4's special tokens
(`<|turn>`/`<turn|>`, `<|image>`/`<|image|>`/`<image|>`, ...) and chat template, and the files of a
`Gemma4Processor` (PIL image processor, audio feature extractor, video section). No network.
`AutoModelForImageTextToText.from_pretrained(dir)` takes the path a hub id takes; the processor loads
with `families.gemma4_processor.load_processor` (AutoProcessor where torchvision imports).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .fileio import atomic_write_text, make_readable

# Gemma 4's special tokens. The first five keep Gemma's ids (pad 0, eos 1, bos 2, unk 3, mask 4);
# the real vocabulary has <|turn>=105, <turn|>=106, <|image>=255999, <|audio>=256000,
# <|image|>=258880, <|audio|>=258881, <image|>=258882, <audio|>=258883, <|video|>=258884.
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
    "<|channel>",
    "<channel|>",
    "<|think|>",
]
# The names Gemma 4's tokenizer_config.json gives them (the processor reads boi/eoi/image/audio ones).
EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
}

# The message loop of the hub's Gemma 4 E2B/E4B `chat_template.jinja`, without its tool-calling
# macros: `<bos>`, an optional system turn (`<|think|>` when enable_thinking), `<|turn>role\n`,
# text trimmed, each image a single `<|image|>` (the processor expands it), `<turn|>\n` closes a
# turn, thinking (`<|channel>...<channel|>`) stripped from model turns, `<|turn>model\n` to generate.
GEMMA4_CHAT_TEMPLATE = (
    "{%- macro strip_thinking(text) -%}"
    "{%- set ns = namespace(result='') -%}"
    "{%- for part in text.split('<channel|>') -%}"
    "{%- if '<|channel>' in part -%}{%- set ns.result = ns.result + part.split('<|channel>')[0] -%}"
    "{%- else -%}{%- set ns.result = ns.result + part -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.result | trim -}}"
    "{%- endmacro -%}"
    "{%- set loop_messages = messages -%}"
    "{{- bos_token -}}"
    "{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] in ['system', 'developer'] -%}"
    "{{- '<|turn>system\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- if messages[0]['content'] is string -%}{{- messages[0]['content'] | trim -}}"
    "{%- else -%}{{- messages[0]['content'][0]['text'] | trim -}}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '<turn|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- if role == 'model' -%}{{- strip_thinking(message['content']) -}}"
    "{%- else -%}{{- message['content'] | trim -}}{%- endif -%}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{%- if role == 'model' -%}{{- strip_thinking(item['text']) -}}"
    "{%- else -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<turn|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}{%- endif -%}"
)


def _corpus() -> list[str]:
    """Gemma 3's tiny corpus (the project's prompts and answers) plus the role names the template
    writes after <|turn>."""
    from .tiny import _corpus as project_corpus

    return project_corpus() + ["user\n", "model\n", "system\n"]


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Gemma 4's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    from .tiny import train_bpe

    tok = train_bpe(SPECIAL_TOKENS, _corpus(), vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        padding_side="right",  # the hub's is "left"; training pads on the right
        chat_template=GEMMA4_CHAT_TEMPLATE,
        model_max_length=8192,
    )


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    text_layers: int = 6,
    kv_shared_layers: int = 2,
    per_layer_input: int = 16,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    patch_size: int = 8,
    pooling_kernel_size: int = 2,
    bidirectional: str | None = None,
    audio: bool = False,
    clipped_linears: bool = True,
    position_embedding_size: int = 64,
):
    """A Gemma4Config shaped like E2B (PLE, KV sharing, sliding:global, double-wide MLP on shared
    layers, final logit soft-cap 30) at toy size. `bidirectional="vision"` is what the 26B-A4B/31B
    configs carry (images attend bidirectionally on sliding layers); None is E2B/E4B."""
    from transformers import Gemma4Config

    if text_layers < 3 or kv_shared_layers >= text_layers - 1:
        raise ValueError("need >= 3 text layers and at least one non-shared sliding + full layer")
    # E2B: 4 sliding + 1 full; here sliding, sliding, full repeated, last layer always full.
    layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(text_layers)]
    layer_types[-1] = "full_attention"
    text_config = dict(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=64,
        hidden_size_per_layer_input=per_layer_input,
        num_kv_shared_layers=kv_shared_layers,
        use_double_wide_mlp=True,
        layer_types=layer_types,
        sliding_window=512,
        max_position_embeddings=4096,
        final_logit_softcapping=30.0,
        use_bidirectional_attention=bidirectional,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision_config = dict(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=vision_hidden // 2,
        patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size,
        position_embedding_size=position_embedding_size,
        use_clipped_linears=clipped_linears,
        initializer_range=0.2,
    )
    audio_config = None
    if audio:
        audio_config = dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[8, 4],
            output_proj_dims=32,
            conv_kernel_size=5,
            initializer_range=0.2,
        )
    return Gemma4Config(
        text_config=text_config, vision_config=vision_config, audio_config=audio_config, initializer_range=0.2
    )


def _sincos_table(positions: int, dim: int) -> torch.Tensor:
    """1-D sine-cosine table (positions, dim): the x and y rows of the vision position table are
    created as ones, so a random tower could not tell patches apart."""
    half = dim // 2
    omega = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _video_processor_dict(patch_size: int, pooling_kernel_size: int, max_soft_tokens: int) -> dict:
    """What Gemma4VideoProcessor(...).to_dict() writes (measured with torchvision 0.28.0), so a folder
    saved without torchvision still loads with AutoProcessor where torchvision is installed."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": max_soft_tokens,
        "num_frames": 32,
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "return_metadata": False,
        "video_processor_type": "Gemma4VideoProcessor",
    }


def build_processor(tokenizer, *, patch_size: int = 8, pooling_kernel_size: int = 2, max_soft_tokens: int = 70):
    """Gemma4Processor (or, without torchvision, the same minus video): PIL image processor
    (aspect-preserving resize to the soft-token budget, patchify), audio feature extractor."""
    from transformers import Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.utils import is_torchvision_available

    from .families.gemma4_processor import Gemma4ImageTextProcessor

    image_processor = Gemma4ImageProcessorPil(
        patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size,
        max_soft_tokens=max_soft_tokens,
    )
    common = dict(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens,
    )
    if is_torchvision_available():
        from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

        video = Gemma4VideoProcessor(
            patch_size=patch_size, pooling_kernel_size=pooling_kernel_size, max_soft_tokens=max_soft_tokens
        )
        return Gemma4Processor(video_processor=video, **common)
    return Gemma4ImageTextProcessor(**common)


def save_processor(
    processor, output_dir: Path, *, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int
) -> None:
    """save_pretrained, then make the files name Gemma4Processor and carry a video section, as the
    hub's do, whichever class wrote them."""
    import json

    processor.save_pretrained(output_dir)
    config_path = output_dir / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Gemma4Processor"
    config.setdefault("video_processor", _video_processor_dict(patch_size, pooling_kernel_size, max_soft_tokens))
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = output_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["processor_class"] = "Gemma4Processor"
    atomic_write_text(tok_path, json.dumps(tok, indent=2, sort_keys=True) + "\n")


def set_token_ids(config, tokenizer) -> None:
    """Point the config's image/audio/video token ids at the tiny tokenizer's (the real ones are > 255k)."""
    ids = tokenizer.convert_tokens_to_ids
    config.image_token_id = ids("<|image|>")
    config.boi_token_id = ids("<|image>")
    config.eoi_token_id = ids("<image|>")
    config.audio_token_id = ids("<|audio|>")
    config.boa_token_id = ids("<|audio>")
    config.eoa_token_index = ids("<audio|>")
    config.video_token_id = ids("<|video|>")


def generation_config(tokenizer):
    """Greedy decoding that stops at <eos> or the end of the model's turn, as the hub's does."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=2, pad_token_id=0, eos_token_id=[1, tokenizer.convert_tokens_to_ids("<turn|>")], do_sample=False
    )


def build_tiny_model(
    output_dir: str | Path,
    seed: int = 0,
    *,
    bidirectional: str | None = None,
    audio: bool = False,
    max_soft_tokens: int = 70,
    patch_size: int = 8,
    pooling_kernel_size: int = 2,
    hidden_size: int = 64,
) -> Path:
    """Write a tiny random Gemma 4 + tokenizer + processor to `output_dir` and return the path."""
    from transformers import Gemma4ForConditionalGeneration

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    # Enough 2-D positions for the largest patch grid the image processor can make at this budget.
    max_side = max_soft_tokens * pooling_kernel_size**2
    config = tiny_config(
        len(tokenizer),
        hidden_size=hidden_size,
        patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size,
        bidirectional=bidirectional,
        audio=audio,
        position_embedding_size=max_side,
    )
    set_token_ids(config, tokenizer)

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():
        table = model.model.vision_tower.patch_embedder.position_embedding_table  # (2, P, D), init ones
        table.copy_(_sincos_table(table.shape[1], table.shape[2]).unsqueeze(0).expand_as(table) * 0.5)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(output_dir)
    processor = build_processor(
        tokenizer, patch_size=patch_size, pooling_kernel_size=pooling_kernel_size, max_soft_tokens=max_soft_tokens
    )
    save_processor(
        processor,
        output_dir,
        patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size,
        max_soft_tokens=max_soft_tokens,
    )
    make_readable(output_dir)  # safetensors writes 0600
    return output_dir
