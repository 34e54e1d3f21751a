#!/usr/bin/env python
"""Write a Gemma 3 folder with the REAL 4b/12b/27b shapes and random bf16 weights (no hub access).

For memory and speed measurements only (find_batch_size.py on a GPU): parameter count, vocabulary
(262,208), 896x896 images of 256 soft tokens and every layer are those of the hub config; the
tokenizer is the tiny BPE one (ids < 1024, same special tokens and chat template), so prompts are
shorter in tokens than with Gemma's tokenizer, while the image tokens, which dominate, are exact.

    python bench/make_random_gemma3.py --size 4b --output_dir /tmp/gemma3-4b-random [--device cuda]
    python scripts/find_batch_size.py --model_name /tmp/gemma3-4b-random --use_qlora --mixed_precision bf16 ...
"""

import argparse
import time
from pathlib import Path

# Shapes from the hub configs of google/gemma-3-{4b,12b,27b}-it (vision tower: SigLIP So400m, 896 px).
TEXT = {
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
VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)
VOCAB, MM_TOKENS = 262208, 256


def build(size: str, output_dir: Path, device: str, text_layers: int | None, vision_layers: int | None) -> int:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from pokemon_gemma.tiny import GEMMA3_CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        TEXT[size],
        vocab_size=VOCAB,
        sliding_window=1024,
        max_position_embeddings=131072,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(VISION)
    if text_layers:
        text["num_hidden_layers"] = text_layers
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    config.hidden_size = text["hidden_size"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # random init on the GPU takes seconds, on the CPU minutes
        model = Gemma3ForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    del model
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2
    )
    Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS,
    ).save_pretrained(output_dir)
    return n_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(TEXT), default="4b", help="which Gemma 3 shape (default: 4b)")
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument(
        "--device",
        default="cuda" if __import__("torch").cuda.is_available() else "cpu",
        help="where the random weights are initialised (default: cuda when available)",
    )
    parser.add_argument("--text_layers", type=int, default=None, help="override the text layer count (smoke tests)")
    parser.add_argument("--vision_layers", type=int, default=None, help="override the vision layer count (smoke tests)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    n = build(args.size, Path(args.output_dir), args.device, args.text_layers, args.vision_layers)
    print(
        f"random gemma-3-{args.size} ({n / 1e9:.2f} B params, bf16) written to {args.output_dir} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
