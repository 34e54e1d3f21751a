"""What a model folder is: its kind, manifests, lineage, adapter -> base, frame layout, family.

Every stage that takes a model folder asks here instead of probing files itself. The kinds:

- `adapter`   a LoRA adapter (adapter_config.json): a training run folder, its best/ or checkpoint-N/
- `merged`    an adapter merged into its base (merge_manifest.json beside the weights)
- `finetuned` a full fine-tuning run (run_config.json beside config.json)
- `mlx`       an MLX export (export_manifest.json)
- `gguf`      a GGUF export (gguf_manifest.json)
- `base`      anything else that loads with from_pretrained: a hub id or a plain model folder

A folder's lineage follows its manifests back to what it was made from (MLX export -> merged
folder -> adapter), so facts recorded at training time (run_config.json: frame layout, dataset)
are found from any later artefact while those folders still exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_CONFIG = "run_config.json"
TRAINING_INFO = "training_info.json"
ADAPTER_CONFIG = "adapter_config.json"
MERGE_MANIFEST = "merge_manifest.json"
MLX_MANIFEST = "export_manifest.json"
GGUF_MANIFEST = "gguf_manifest.json"
MODEL_CONFIG = "config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FRAME_LAYOUTS = ("images", "grid")
KINDS = ("base", "adapter", "merged", "finetuned", "mlx", "gguf")
MANIFESTS = (MERGE_MANIFEST, MLX_MANIFEST, GGUF_MANIFEST)


class ArtifactError(ValueError):
    """A model folder is not what it must be; the message is one line naming the file."""


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_mlx_export(path: str | Path) -> bool:
    return (Path(path) / MLX_MANIFEST).is_file()


def is_gguf_export(path: str | Path) -> bool:
    return (Path(path) / GGUF_MANIFEST).is_file()


def folder_kind(model: str | Path, adapter: str | Path | None = None) -> str:
    """One of KINDS, from the folder's own files (and whether an adapter is put on top)."""
    folder = Path(model)
    if is_mlx_export(folder):
        return "mlx"
    if is_gguf_export(folder):
        return "gguf"
    if adapter or is_adapter_dir(folder):
        return "adapter"
    if (folder / MERGE_MANIFEST).is_file():
        return "merged"
    if (folder / RUN_CONFIG).is_file() and (folder / MODEL_CONFIG).is_file():
        return "finetuned"
    return "base"


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on (adapter_config.json's base_model_name_or_path)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = read_json(path)
    if config is None:
        raise ArtifactError(f"{path}: missing or not a JSON object (not a LoRA adapter folder)")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ArtifactError(
            f"{path}: no base_model_name_or_path (pass the base model explicitly, e.g. --model_name BASE "
            f"--adapter_path {adapter_dir})"
        )
    return base


@dataclass(frozen=True)
class ModelRef:
    """What to load: `model` (hub id or folder) with an optional `adapter` on top, and its kind."""

    model: str
    adapter: str | None
    kind: str


def resolve_model(model: str | Path, adapter: str | Path | None = None) -> ModelRef:
    """An adapter folder given as the model stands for "its base + this adapter"."""
    model, adapter = str(model), (str(adapter) if adapter else None)
    kind = folder_kind(model, adapter)
    if adapter is None and kind == "adapter":
        adapter, model = model, adapter_base_model(model)
    return ModelRef(model, adapter, kind)


def adapter_weights(adapter_dir: str | Path) -> Path:
    """The adapter's weights file; ArtifactError naming what is missing."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ArtifactError(
            f"{folder}: adapter folder not found (pass the training run folder, its best/ or a checkpoint-N/)"
        )
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ArtifactError(
            f"{folder}/{ADAPTER_CONFIG}: missing (not a LoRA adapter folder; pass the run folder, "
            f"best/ or checkpoint-N/ that holds {ADAPTER_CONFIG})"
        )
    if read_json(folder / ADAPTER_CONFIG) is None:
        raise ArtifactError(f"{folder}/{ADAPTER_CONFIG}: invalid JSON")
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise ArtifactError(
        f"{folder}/{ADAPTER_WEIGHTS[0]}: missing (the adapter folder has no weights; re-save the "
        "adapter or pass another checkpoint)"
    )


# --------------------------------------------------------------------------- lineage and recorded facts
def _sources(manifest: dict[str, Any]) -> list[str]:
    """The folders a manifest says its folder was made from (MLX/GGUF: the merged folder; merge: the adapter)."""
    out = [manifest.get("source")]
    adapter = manifest.get("adapter")
    if isinstance(adapter, dict):
        out.append(adapter.get("path"))
    return [s for s in out if isinstance(s, str) and s]


def lineage(folder: str | Path, depth: int = 4) -> list[Path]:
    """`folder`, then the folders its manifests say it was made from, while they exist."""
    dirs: list[Path] = []
    queue = [Path(folder)]
    while queue and len(dirs) < depth:
        current = queue.pop(0)
        if current in dirs:
            continue
        dirs.append(current)
        for name in MANIFESTS:
            manifest = read_json(current / name)
            if manifest:
                queue += [Path(s) for s in _sources(manifest) if Path(s).is_dir()]
    return dirs


def run_config_path(folder: str | Path) -> Path | None:
    """The training run's run_config.json: in the folder or, for best/ and checkpoint-N/, its parent."""
    folder = Path(folder)
    for candidate in (folder / RUN_CONFIG, folder.parent / RUN_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def find_run_config(folder: str | Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The run_config.json of the folder or of the first folder in its lineage that has one."""
    for d in lineage(folder):
        path = run_config_path(d)
        config = read_json(path) if path else None
        if config is not None:
            return config, path
    return None, None


def find_base_model(folder: str | Path) -> str | None:
    """The base model id of anything in the lineage (adapter config, manifests, config `_name_or_path`)."""
    for d in lineage(folder):
        adapter = read_json(d / ADAPTER_CONFIG)
        if adapter and isinstance(adapter.get("base_model_name_or_path"), str):
            return adapter["base_model_name_or_path"]
        for name in MANIFESTS:
            base = (read_json(d / name) or {}).get("base_model")
            if isinstance(base, str) and base:
                return base
        name_or_path = (read_json(d / MODEL_CONFIG) or {}).get("_name_or_path")
        if isinstance(name_or_path, str) and name_or_path:
            return name_or_path
    return None


def frame_layout(*folders: str | Path | None) -> str | None:
    """The frame layout a model was trained with, as recorded by its training run or a manifest in its
    lineage; None when nothing records it (then the FRAME_LAYOUT setting applies)."""
    for folder in folders:
        if not folder:
            continue
        for d in lineage(folder):
            run_config = run_config_path(d)
            for path in [run_config] + [d / name for name in MANIFESTS]:
                layout = (read_json(path) or {}).get("frame_layout") if path else None
                if layout in FRAME_LAYOUTS:
                    return layout
    return None


def model_type(folder: str | Path) -> str | None:
    """config.json's model_type of a model folder (of the adapter's base for an adapter folder)."""
    folder = Path(folder)
    if is_adapter_dir(folder):
        try:
            folder = Path(adapter_base_model(folder))
        except ArtifactError:
            return None
    value = (read_json(folder / MODEL_CONFIG) or {}).get("model_type")
    return value if isinstance(value, str) else None
