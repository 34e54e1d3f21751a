"""Checkpoints that resume bit-exactly: weights (adapter or model), optimizer, scheduler, RNG
states of every process, data position and step. Written to a temp folder, then renamed."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write_json, staged_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp folders of an interrupted save are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model, path: Path, processor=None) -> None:
    """The adapter (PEFT) or the full model, plus the processor when given."""
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict[str, Any],
    run_config: dict[str, Any],
    rng_states: list[dict[str, Any]],
    save_total_limit: int,
) -> Path:
    """Write checkpoint-{step}/ atomically and drop the oldest beyond `save_total_limit`."""
    final = output_dir / f"checkpoint-{step}"
    with staged_dir(final, tag="tmp") as tmp:
        save_weights(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng_state_{rank}.pth")
        atomic_write_json(tmp / "run_config.json", run_config)
        atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
    if save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the folder and what is wrong."""


def tied_parameter_names(model) -> set[str]:
    """Parameters that share storage with an earlier one (e.g. lm_head tied to the embeddings):
    save_pretrained writes each tensor once, so these are absent from a saved state dict."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        ptr = param.data_ptr()
        if ptr in seen:
            tied.add(name)
        else:
            seen[ptr] = name
    return tied


def saved_names(model) -> dict[str, str]:
    """{name in the files save_pretrained writes: name in model.state_dict()}. transformers 5 saves
    under the hub's original names (Gemma 3: `language_model.model.*` for `model.language_model.*`),
    through the same reverse conversion asked here one key at a time."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers save the names they use
        return {key: key for key in state}
    names = {}
    for key, value in state.items():
        (saved,) = revert_weight_conversion(model, {key: value})
        names[saved] = key
    return names


def load_full_weights(model, path: Path) -> None:
    """Load a full-model checkpoint strictly: every parameter but the tied ones must be in the files."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise CheckpointError(f"{path}: no *.safetensors weights in this full fine-tuning checkpoint")
    names = saved_names(model)
    file_name = {model_key: saved for saved, model_key in names.items()}
    result = model.load_state_dict({names.get(k, k): v for k, v in state.items()}, strict=False)
    missing = sorted(file_name.get(k, k) for k in set(result.missing_keys) - tied_parameter_names(model))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model ({len(missing)} missing, e.g. {missing[:1]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return the trainer state."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        load_full_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{rank}.pth"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return load_trainer_state(path)
