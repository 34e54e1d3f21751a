"""The fixes mlx-vlm's converter needs on a transformers-5 folder, each applied only when needed
(measured with mlx 0.32 / mlx-vlm 0.7.10 / transformers 5.23: several fail silently). Which fixes a
model family needs is the family's `mlx_fixes` (pokemon_gemma.families)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..fileio import atomic_write_json
from ..hub_names import rename_to_hub


# Each fix takes the config dict and returns a description when it changed something, else None.
def fix_mm_tokens_in_text_config(config: dict) -> str | None:
    """mlx-vlm reads `mm_tokens_per_image` from text_config (default 256): the projector's pooling
    kernel comes from it (tiny model: a crash; other values: wrongly pooled images)."""
    value = config.get("mm_tokens_per_image")
    text = config.setdefault("text_config", {})
    if value is None or text.get("mm_tokens_per_image") == value:
        return None
    text["mm_tokens_per_image"] = value
    return f"text_config.mm_tokens_per_image = {value} (copied from the top level)"


def fix_top_level_hidden_size(config: dict) -> str | None:
    """mlx-vlm divides image features by sqrt(top-level hidden_size) (default 2048) before the text
    model multiplies every embedding by sqrt(text hidden_size): a wrong value gives wrong logits."""
    value = config.get("text_config", {}).get("hidden_size")
    if value is None or config.get("hidden_size") == value:
        return None
    config["hidden_size"] = value
    return f"hidden_size = {value} (top level, from text_config)"


def fix_rope_parameters(config: dict) -> str | None:
    """transformers 5 writes `rope_parameters` per attention type; mlx-vlm reads `rope_scaling`,
    `rope_local_base_freq` and `rope_global_base_freq` and silently uses defaults otherwise (dropping
    e.g. gemma-3-4b's linear x8 scaling of the global layers)."""
    text = config.get("text_config", {})
    params = text.get("rope_parameters")
    if not isinstance(params, dict):
        return None
    full = params.get("full_attention", params)
    sliding = params.get("sliding_attention")
    changes = []
    if "rope_theta" in full:
        for key in ("rope_theta", "rope_global_base_freq"):
            if text.get(key) != full["rope_theta"]:
                text[key] = full["rope_theta"]
                changes.append(f"{key}={full['rope_theta']}")
    if sliding and "rope_theta" in sliding and text.get("rope_local_base_freq") != sliding["rope_theta"]:
        text["rope_local_base_freq"] = sliding["rope_theta"]
        changes.append(f"rope_local_base_freq={sliding['rope_theta']}")
    rope_type = full.get("rope_type", "default")
    if rope_type != "default":
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        if text.get("rope_scaling") != scaling:
            text["rope_scaling"] = scaling
            changes.append(f"rope_scaling={scaling}")
    if not changes:
        return None
    return "text_config from rope_parameters: " + ", ".join(changes)


def fix_global_head_dim(config: dict) -> str | None:
    """Gemma 4: transformers 5.23 saves `global_head_dim` / `num_global_key_value_heads` only as
    `per_layer_config` {full layer: {"head_dim", "num_key_value_heads"}}; mlx-vlm reads
    `text_config.global_head_dim` (default 512), so every full-attention shape is wrong ("Expected
    shape (1024, 64) but received shape (128, 64) for ...layers.2.self_attn.q_proj.weight")."""
    text = config.get("text_config", {})
    per_layer = text.get("per_layer_config") or {}
    full = [
        str(i) for i, t in enumerate(text.get("layer_types") or []) if t == "full_attention" and str(i) in per_layer
    ]
    if not full:
        return None
    overrides, changes = per_layer[full[0]], []
    for source, key in (("head_dim", "global_head_dim"), ("num_key_value_heads", "num_global_key_value_heads")):
        if source in overrides and text.get(key) != overrides[source]:
            text[key] = overrides[source]
            changes.append(f"{key}={overrides[source]}")
    return "text_config from per_layer_config: " + ", ".join(changes) if changes else None


CONFIG_FIXES: tuple[Callable[[dict], str | None], ...] = (
    fix_mm_tokens_in_text_config,
    fix_top_level_hidden_size,
    fix_rope_parameters,
    fix_global_head_dim,
)
VISION_PREFIX_FIX = "vision_tower.* weights renamed to vision_tower.vision_model.*"
MLX_FIXES = [f.__name__ for f in CONFIG_FIXES] + ["fix_vision_tower_prefix"]


def apply_config_fixes(config: dict, names=tuple(MLX_FIXES)) -> list[dict[str, str]]:
    """Apply every config fix in `names` that is needed; [{"fix": name, "change": what changed}] for those."""
    applied = []
    for fix in (f for f in CONFIG_FIXES if f.__name__ in names):
        change = fix(config)
        if change:
            applied.append({"fix": fix.__name__, "change": change})
    return applied


def fix_vision_tower_prefix(folder: Path) -> str | None:
    """mlx-vlm expects the hub's `vision_tower.vision_model.*`; a flat folder (written by an older
    tiny builder, or saved from a model built from a config) gets the rename in the staging copy."""
    renamed = rename_to_hub(folder)
    return f"{VISION_PREFIX_FIX} ({renamed} tensors)" if renamed else None


def prepare_mlx_source(model_path: Path, work_dir: Path, names=tuple(MLX_FIXES)) -> list[dict[str, str]]:
    """A fixed copy of `model_path` in `work_dir` (weights linked unless rewritten) with the fixes in
    `names` (the family's) applied where needed; the fixes applied."""
    for item in model_path.iterdir():
        dest = work_dir / item.name
        if item.is_dir():
            shutil.copytree(item, dest)
        elif item.suffix == ".safetensors":
            os.symlink(item.resolve(), dest)  # read-only use; a rewritten shard replaces the link
        else:
            shutil.copy2(item, dest)
    config = json.loads((work_dir / "config.json").read_text())
    fixes = apply_config_fixes(config, names)
    if fixes:
        (work_dir / "config.json").unlink()
        atomic_write_json(work_dir / "config.json", config)
    vision = fix_vision_tower_prefix(work_dir) if "fix_vision_tower_prefix" in names else None
    if vision:
        fixes.append({"fix": "fix_vision_tower_prefix", "change": vision})
    return fixes
