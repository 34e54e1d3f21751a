#!/usr/bin/env python
"""Write a Gemma 3 (4b/12b/27b) or Gemma 4 (e2b/e4b) folder with the REAL shapes and random bf16 weights.

For memory and speed measurements only (find_batch_size.py on a GPU), no hub access. Every layer,
the vocabulary (embedding rows) and the image soft tokens are those of the hub model; the tokenizer
is the project's tiny BPE one (ids < 1024, the family's special tokens and chat template), so the
text part of a prompt is shorter in tokens than with Gemma's tokenizer while the image tokens,
which dominate, are exact.

    python bench/make_random_model.py --size 4b --output_dir /tmp/gemma3-4b-random [--device cuda]
    python bench/make_random_model.py --size e2b --output_dir /tmp/gemma4-e2b-random
    python scripts/find_batch_size.py --model_name /tmp/gemma4-e2b-random --use_qlora --mixed_precision bf16 ...

Sources of the figures:
- Gemma 3: the hub configs of google/gemma-3-{4b,12b,27b}-it (vision: SigLIP So400m, 896 px, 256 tokens).
- Gemma 4 E2B (google/gemma-4-e2b-it) text: hidden 1536, 35 layers (4 sliding : 1 full, full at 4, 9,
  ..., 34), 8 heads, 1 KV head, head dim 256 (sliding) / 512 (full), intermediate 6144 with the
  double-wide MLP on KV-shared layers, per-layer embeddings 256 x 262,144, the last 20 layers share KV,
  sliding window 512, vocabulary 262,144, final logit soft-cap 30: copies of the hub config.json in
  public test fixtures (found with the `search` tool: find_string '"num_kv_shared_layers": 20'); the
  model-card summaries agree on 35 layers, hidden 1536, PLE 256, window 512.
- Gemma 4 E4B (google/gemma-4-e4b-it) text: hidden 2560, 42 layers (5 sliding : 1 full, full at 5, 11,
  ..., 41), 8 heads, 2 KV heads, head dims 256 / 512, intermediate 10240, no double-wide MLP, PLE 256,
  the last 18 layers share KV, window 512, vocabulary 262,144: public copies of its config.json and
  NVIDIA Megatron-Bridge's E4B recipe docstring (42 layers, 2560, 10240, 2 KV heads, global head dim
  512, KV shared across the last 18 layers).
- Vision tower (both): hidden 768, intermediate 3072, 16 layers, 12 heads (12 KV), head dim 64, patch
  16, pooling 3, position table 10240, clipped linears: the E2B config copy; these are also
  transformers 5.23's Gemma4VisionConfig defaults. NOT confirmed for E4B from its own config: assumed
  the same tower (the model card gives both ~150 M vision parameters).
- Audio tower (both): transformers' Gemma4AudioConfig defaults (hidden 1024, 12 layers, 8 heads,
  output 1536), which the E2B copy and an E4B copy repeat. Kept by default because a hub load
  allocates it too (QLoRA keeps it unquantised); `--no_audio` drops it (the model class allows
  `audio_config=None`; image prompts never use it).
- Image budget: the processor writes 280 soft tokens per image at most (the hub default), patch 16,
  pooling 3; `--image_tokens` at train time changes it as for the real model.
"""

import argparse
import sys
import time
from pathlib import Path

# Shapes from the hub configs of google/gemma-3-{4b,12b,27b}-it (vision tower: SigLIP So400m, 896 px).
GEMMA3_TEXT = {
    "4b": dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "12b": dict(
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "27b": dict(
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
    ),
}
GEMMA3_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)
GEMMA3_VOCAB, GEMMA3_MM_TOKENS = 262208, 256

# Gemma 4 E2B/E4B text configs (sources in the module docstring). `full_every`: one full-attention
# layer after every (full_every - 1) sliding ones.
GEMMA4_TEXT = {
    "e2b": dict(
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        full_every=5,
    ),
    "e4b": dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_kv_shared_layers=18,
        use_double_wide_mlp=False,
        full_every=6,
    ),
}
GEMMA4_TEXT_COMMON = dict(
    head_dim=256,
    global_head_dim=512,
    hidden_size_per_layer_input=256,
    vocab_size=262144,
    vocab_size_per_layer_input=262144,
    sliding_window=512,
    max_position_embeddings=131072,
    final_logit_softcapping=30.0,
    attention_k_eq_v=False,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
GEMMA4_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=12,
    head_dim=64,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=10240,
    use_clipped_linears=True,
)
GEMMA4_AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, output_proj_dims=1536)
GEMMA4_IMAGE_TOKENS = 280
SIZES = {**{s: "gemma3" for s in GEMMA3_TEXT}, **{s: "gemma4" for s in GEMMA4_TEXT}}


# ----------------------------------------------------------------------------------------------- configs
def gemma3_config(size: str, text_layers: int | None, vision_layers: int | None):
    from transformers import Gemma3Config

    from pokemon_gemma.tiny import build_tokenizer, set_token_ids

    text = dict(
        GEMMA3_TEXT[size],
        vocab_size=GEMMA3_VOCAB,
        sliding_window=1024,
        max_position_embeddings=131072,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(GEMMA3_VISION)
    if text_layers:
        text["num_hidden_layers"] = text_layers
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_MM_TOKENS)
    set_token_ids(config, build_tokenizer())
    return config


def gemma4_layers(size: str, n_layers: int | None) -> tuple[list[str], int]:
    """Layer types and KV-shared layer count, the hub's at full depth. A reduced depth keeps the
    pattern's start and shares KV over the same fraction of layers, as long as the layers that
    compute KV still include both attention types (transformers requires it)."""
    spec = GEMMA4_TEXT[size]
    full, every = spec["num_hidden_layers"], spec["full_every"]
    n = n_layers or full
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"  # Gemma 4's last layer is always a full one
    shared = spec["num_kv_shared_layers"] * n // full
    while shared and set(types[: n - shared]) != set(types):
        shared -= 1
    return types, shared


def gemma4_config(size: str, text_layers: int | None, vision_layers: int | None, audio: bool):
    from transformers import Gemma4Config

    from pokemon_gemma.tiny_gemma4 import build_tokenizer, set_token_ids

    types, shared = gemma4_layers(size, text_layers)
    text = {k: v for k, v in GEMMA4_TEXT[size].items() if k != "full_every"}
    text.update(GEMMA4_TEXT_COMMON, num_hidden_layers=len(types), layer_types=types, num_kv_shared_layers=shared)
    vision = dict(GEMMA4_VISION)
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=dict(GEMMA4_AUDIO) if audio else None)
    set_token_ids(config, build_tokenizer())
    return config


def make_config(size: str, text_layers=None, vision_layers=None, audio: bool = True):
    if SIZES[size] == "gemma3":
        return gemma3_config(size, text_layers, vision_layers)
    return gemma4_config(size, text_layers, vision_layers, audio)


def model_class(size: str):
    import transformers

    name = "Gemma3ForConditionalGeneration" if SIZES[size] == "gemma3" else "Gemma4ForConditionalGeneration"
    return getattr(transformers, name)


def count_params(size: str, audio: bool = True, **layers) -> int:
    """Parameters of the model at this shape, built on the meta device (no memory for weights)."""
    import torch

    with torch.device("meta"):
        model = model_class(size)(make_config(size, audio=audio, **layers))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


# ----------------------------------------------------------------------------------------------- writing
def save_processor(size: str, output_dir: Path) -> None:
    if SIZES[size] == "gemma3":
        from pokemon_gemma import tiny

        tiny.build_processor(tiny.build_tokenizer(), GEMMA3_VISION["image_size"], GEMMA3_MM_TOKENS).save_pretrained(
            output_dir
        )
        return
    from pokemon_gemma import tiny_gemma4

    geometry = dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=GEMMA4_IMAGE_TOKENS)
    processor = tiny_gemma4.build_processor(tiny_gemma4.build_tokenizer(), **geometry)
    tiny_gemma4.save_processor(processor, output_dir, **geometry)


def build(size: str, output_dir: Path, device: str, text_layers=None, vision_layers=None, audio=True) -> int:
    """Write the random model + tiny tokenizer/processor; returns the parameter count written."""
    import torch

    from pokemon_gemma.fileio import make_readable

    config = make_config(size, text_layers, vision_layers, audio)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # the weights are never held in fp32
    with torch.device(device):  # random init on the GPU takes seconds, on the CPU minutes
        model = model_class(size)(config)
    if SIZES[size] == "gemma4":
        from pokemon_gemma.tiny_gemma4 import build_tokenizer, generation_config

        model.generation_config = generation_config(build_tokenizer())
    n_params = sum(p.numel() for p in model.parameters())
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    del model
    save_processor(size, output_dir)
    make_readable(output_dir)  # safetensors writes 0600
    return n_params


def check(output_dir: Path) -> str:
    """Load the folder as a hub id is loaded and run one forward pass on a 4-frame prompt."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from pokemon_gemma.modeling import load_processor

    processor = load_processor(str(output_dir))
    model = AutoModelForImageTextToText.from_pretrained(output_dir, dtype=torch.bfloat16).eval()
    frames = [Image.new("RGB", (240, 160), (40 * i, 90, 200 - 40 * i)) for i in range(4)]
    content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": "Which button next?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, images=frames, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if not torch.isfinite(logits.float()).all():
        raise SystemExit("error: the forward pass gave non-finite logits")
    return f"forward ok: {inputs['input_ids'].shape[1]} prompt tokens ({n_image} image), logits {tuple(logits.shape)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="4b",
        help="Gemma 3 4b/12b/27b or Gemma 4 e2b/e4b (default: 4b)",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument(
        "--device",
        default="cuda" if __import__("torch").cuda.is_available() else "cpu",
        help="where the random weights are initialised (default: cuda when available)",
    )
    parser.add_argument("--text_layers", type=int, default=None, help="override the text layer count (smoke tests)")
    parser.add_argument("--vision_layers", type=int, default=None, help="override the vision layer count (smoke tests)")
    parser.add_argument(
        "--no_audio",
        action="store_true",
        help="Gemma 4: leave out the audio tower (~0.3 B parameters a hub load allocates; unused by image prompts)",
    )
    parser.add_argument(
        "--check", action="store_true", help="then load the folder and run one forward pass on a 4-frame prompt"
    )
    args = parser.parse_args(argv)
    for name in ("text_layers", "vision_layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be at least 1")
    audio = not args.no_audio
    start = time.perf_counter()
    full = count_params(args.size, audio=audio)
    n = build(args.size, Path(args.output_dir), args.device, args.text_layers, args.vision_layers, audio)
    family = SIZES[args.size].replace("gemma", "gemma-")
    print(
        f"random {family}-{args.size} ({n / 1e9:.3f} B params written, {full / 1e9:.3f} B at full depth"
        f"{'' if audio or family == 'gemma-3' else ', no audio tower'}; bf16) written to {args.output_dir} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    if args.check:
        print(check(Path(args.output_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
