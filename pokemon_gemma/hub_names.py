"""The hub's weight names for a Gemma 3 folder, and the rename that gives a folder those names.

Gemma 3 on the hub stores the SigLIP tower as `vision_tower.vision_model.*`. transformers >= 5.8
loads it into a flat SigLIP and, on `save_pretrained`, writes the hub names back only for a model
that was *loaded* with them (it reverses the load-time renamings it recorded). A model built from a
config (the tiny builder, `bench/make_random_model.py`) has none recorded and is saved flat
(`vision_tower.*`), and so is every folder derived from it: merges, checkpoints, exports.

Other tools only know the hub's names: llama.cpp's converter cannot map `vision_tower.embeddings.*`
(the mmproj fails), and mlx-vlm silently needs them too. So the folders this project writes use the
hub's names: the tiny builder renames after saving, and transformers then keeps them through
training and merging. `rename_to_hub` is also the safety net the exporters apply to a staging copy
of an older, flat folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .fileio import FILE_MODE, atomic_write_json

INDEX_FILE = "model.safetensors.index.json"
FLAT_VISION = "vision_tower."
HUB_VISION = "vision_tower.vision_model."


def hub_key(key: str) -> str:
    """`vision_tower.X` -> `vision_tower.vision_model.X`; every other key is already the hub's."""
    if key.startswith(FLAT_VISION) and not key.startswith(HUB_VISION):
        return HUB_VISION + key[len(FLAT_VISION) :]
    return key


def flat_keys(folder: str | Path) -> int:
    """How many weights of the folder's safetensors shards are not named as on the hub."""
    from safetensors import safe_open

    count = 0
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            count += sum(hub_key(k) != k for k in fh.keys())
    return count


def rename_to_hub(folder: str | Path) -> int:
    """Rewrite the shards (and the index) of `folder` that hold flat names; returns how many tensors
    were renamed (0: nothing written). Each rewritten shard replaces the old file atomically (a
    symlinked shard is replaced by a real file, its target left alone)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    renamed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            keys = list(fh.keys())
            if all(hub_key(k) == k for k in keys):
                continue
            tensors = {hub_key(k): fh.get_tensor(k) for k in keys}
            metadata = fh.metadata() or {}
        renamed += sum(hub_key(k) != k for k in keys)
        tmp = shard.with_name(f".{shard.name}.tmp")
        save_file(tensors, tmp, metadata={**metadata, "format": "pt"})
        os.chmod(tmp, FILE_MODE)  # safetensors writes 0600
        if shard.is_symlink():
            shard.unlink()
        os.replace(tmp, shard)
        del tensors
    index = folder / INDEX_FILE
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {hub_key(k): v for k, v in data.get("weight_map", {}).items()}
        if index.is_symlink():
            index.unlink()
        atomic_write_json(index, data)
    return renamed
