#!/usr/bin/env python
"""How much a model (optionally with a LoRA adapter) relies on its frames, side by side for several models.

For navigation windows of a converted dataset (answers that name the player's tile), per model:
- the attention mass the last prompt token puts on image soft tokens, per text layer (mean over heads
  and windows; eager attention);
- the relative change of the last prompt token's final hidden state when the window's newest frame is
  replaced by the next window's (|h' - h| / |h|): how far the frames move the answer;
- the image embeddings the language model receives: mean norm and mean pairwise cosine of the soft tokens.

Why: the tiny Gemma 4 trained with the demo recipe answers `left` on every held-out navigation window.
This measures whether it looks at the frames at all, at initialisation and after training.

    python bench/image_reliance.py --dataset_path DATA/val.jsonl MODEL[:ADAPTER] [MODEL[:ADAPTER] ...] [--windows 12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pokemon_gemma.collate import Collator
from pokemon_gemma.dataset import Record, load_records
from pokemon_gemma.families import family_of


def load(spec: str):
    from transformers import AutoConfig, AutoModelForImageTextToText

    path, _, adapter = spec.partition(":")
    family = family_of(AutoConfig.from_pretrained(path))
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, Collator(family.load_processor(path)), family


@torch.no_grad()
def measure(spec: str, records: list[Record]) -> dict:
    model, collator, family = load(spec)
    inner = (model.get_base_model() if hasattr(model, "get_base_model") else model).model  # the *Model
    attention, changes, features = None, [], []
    for i, record in enumerate(records):
        batch = collator.pad([collator.encode(record, with_answer=False)])
        out = model(**batch, output_attentions=True, output_hidden_states=True)
        is_image = batch["input_ids"][0] == collator.image_token_id
        mass = torch.stack([a[0, :, -1, :][:, is_image].sum(-1).mean() for a in out.attentions])
        attention = mass if attention is None else attention + mass
        hidden = out.hidden_states[-1][0, -1]
        other = records[(i + 1) % len(records)]
        swapped = Record(record.frames[:-1] + other.frames[-1:], record.context, record.question, record.output)
        moved = model(**collator.pad([collator.encode(swapped, with_answer=False)]), output_hidden_states=True)
        changes.append(float((moved.hidden_states[-1][0, -1] - hidden).norm() / hidden.norm()))
        pixel = {k: v for k, v in batch.items() if k in ("pixel_values", "image_position_ids")}
        projected = family.image_features(inner, pixel)  # a tensor, or one tensor per image (Gemma 4)
        projected = torch.cat(list(projected)) if isinstance(projected, (list, tuple)) else projected
        features.append(projected.reshape(-1, projected.shape[-1]))
    f = torch.cat(features).float()
    cosine = torch.nn.functional.cosine_similarity(f[:, None], f[None], dim=-1).mean()
    return {
        "model": spec,
        "image_tokens_per_window": int(is_image.sum()),
        "attention_on_images_by_layer": [round(x, 3) for x in (attention / len(records)).tolist()],
        "last_hidden_change_when_newest_frame_swapped": round(sum(changes) / len(changes), 4),
        "image_embedding_norm": round(float(f.norm(dim=-1).mean()), 2),
        "image_embedding_mean_cosine": round(float(cosine), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folder, or FOLDER:ADAPTER for a LoRA adapter on it")
    parser.add_argument("--dataset_path", required=True, help="converted JSONL (navigation windows are used)")
    parser.add_argument("--windows", type=int, default=12, help="navigation windows measured per model")
    parser.add_argument("--output", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = [r for r in load_records(args.dataset_path) if "Player at tile" in r.output][: args.windows]
    if len(records) < 2:
        raise SystemExit(f"error: {args.dataset_path}: fewer than 2 navigation windows")
    results = [measure(spec, records) for spec in args.models]
    for r in results:
        print(json.dumps(r))
    if args.output:
        from pokemon_gemma.fileio import atomic_write_json

        atomic_write_json(Path(args.output), results)


if __name__ == "__main__":
    main()
