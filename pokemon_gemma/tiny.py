"""Build a tiny random Gemma 3 vision-language model that loads like a real one.

The folder it writes holds a `config.json`, safetensors weights, a fast tokenizer with Gemma's
special tokens and chat template, and a `Gemma3Processor`: `AutoProcessor.from_pretrained(dir)`
and `AutoModelForImageTextToText.from_pretrained(dir)` take exactly the path a hub id takes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .fileio import make_readable

# Gemma's special tokens, in Gemma's id order for the first three (pad 0, eos 1, bos 2).
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# Gemma 3's chat template (the hub's `chat_template.jinja`): images become `<start_of_image>`.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Text the BPE merges are learned from: the prompts and answers this project feeds the model,
# so that answers are a handful of tokens rather than one per byte.
_BUTTONS = ["up", "down", "left", "right", "a", "b", "start", "select"]
_CORPUS = [
    'What button should be pressed next? Answer with JSON: {"button": "<button>", "reasoning": "...", '
    '"context": "...", "scene_description": "..."}',
    "Session goal: walk to the door and enter the house. Previous buttons: up, left, a.",
    "Frames t-3, t-2, t-1, t (oldest first). navigation battle menu dialogue pokemon_center",
    "Go to the door. Talk to the NPC. Explore the route and find the next town.",
] + [
    f'{{"button": "{b}", "reasoning": "move {b} toward the goal", "context": "navigation", '
    f'"scene_description": "overworld"}}'
    for b in _BUTTONS
]


def _corpus() -> list[str]:
    """The fixed prompt text and the demo's goal sentences are in the corpus too: an untrained-on
    question costs ~100 tokens and measurably drowns the image signal of a tiny model."""
    from .dataset import QUESTION
    from .demo import GOAL_SENTENCES

    return _CORPUS + [QUESTION] + ["Goal: " + goal for goal in GOAL_SENTENCES]


def train_bpe(special_tokens: list[str], corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE `tokenizers.Tokenizer` with `special_tokens` first (their ids in that order),
    trained on `corpus`: the base of every family's tiny tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Gemma's special tokens, trained on a fixed corpus."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(SPECIAL_TOKENS, _corpus(), vocab_size)
    # Gemma's post-processor: encoding with special tokens prepends <bos>. The project always
    # tokenizes with add_special_tokens=False (the chat template writes the <bos>); llama.cpp's
    # converter reads this to set add_bos_token, as real Gemma 3 GGUFs have it.
    bos = ("<bos>", tok.token_to_id("<bos>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[bos]
    )
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
            "sot_token": "<start_of_turn>",
            "eot_token": "<end_of_turn>",
        },
        padding_side="right",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        model_max_length=8192,
    )


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position table (grid*grid, dim): a random tiny vision tower otherwise cannot
    tell where a patch is (measured: accuracy ≈0.6 without, ≈0.88 with)."""
    assert dim % 4 == 0
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)


def tiny_config(
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    mm_tokens_per_image: int = 16,
    hidden_size: int = 64,
    text_layers: int = 6,
    vision_layers: int = 2,
):
    from transformers import Gemma3Config

    patches_per_side = image_size // patch_size
    root = math.isqrt(mm_tokens_per_image)
    if root * root != mm_tokens_per_image or patches_per_side % root:
        raise ValueError(
            f"mm_tokens_per_image={mm_tokens_per_image} must be a perfect square whose root divides "
            f"image_size/patch_size={patches_per_side}"
        )
    if hidden_size % 64:
        raise ValueError("hidden_size must be a multiple of 64 (bitsandbytes CPU nf4 crashes below)")
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        sliding_window=512,
        sliding_window_pattern=min(6, text_layers),
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision_config = dict(
        model_type="siglip_vision_model",
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=mm_tokens_per_image,
        initializer_range=0.2,
    )


def build_tiny_model(
    output_dir: str | Path, seed: int = 0, image_size: int = 64, hidden_size: int = 64, mm_tokens_per_image: int = 16
) -> Path:
    """Write a tiny random Gemma 3 + tokenizer + processor to `output_dir` and return the path
    (`mm_tokens_per_image=256` with `image_size=128`: the real Gemma 3's prompt length)."""
    from transformers import Gemma3ForConditionalGeneration, GenerationConfig

    from .hub_names import rename_to_hub

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = tiny_config(len(tokenizer), image_size, hidden_size=hidden_size, mm_tokens_per_image=mm_tokens_per_image)
    set_token_ids(config, tokenizer)

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        # The projector weight is created as zeros: every image would project to nothing.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, 1.0 / math.sqrt(proj.shape[0]))
        pos = model.model.vision_tower.embeddings.position_embedding.weight
        pos.copy_(_sincos_2d(image_size // config.vision_config.patch_size, pos.shape[1]))
    model.generation_config = GenerationConfig(
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=[1, ids("<end_of_turn>")],
        do_sample=False,
    )
    model.save_pretrained(output_dir)
    # Built from a config, the model is saved with transformers 5's flat SigLIP names; the hub's
    # (vision_tower.vision_model.*) are what other tools read, and transformers keeps them from here on.
    rename_to_hub(output_dir)

    build_processor(tokenizer, image_size, config.mm_tokens_per_image).save_pretrained(output_dir)
    make_readable(output_dir)  # safetensors writes 0600
    return output_dir


def set_token_ids(config, tokenizer) -> None:
    """Point a Gemma3Config's image token ids at the tiny tokenizer's (the real ones are > 255k) and
    give it the top-level hidden_size real Gemma 3 configs on the hub carry (MLX export reads it)."""
    ids = tokenizer.convert_tokens_to_ids
    config.boi_token_index = ids("<start_of_image>")
    config.eoi_token_index = ids("<end_of_image>")
    config.image_token_index = ids("<image_soft_token>")
    config.hidden_size = config.text_config.hidden_size


def build_processor(tokenizer, image_size: int, mm_tokens_per_image: int):
    """A Gemma3Processor for square `image_size` images of `mm_tokens_per_image` soft tokens."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        resample=2,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
