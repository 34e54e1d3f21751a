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

from .fileio import atomic_write_json

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


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place (the old one, if any, is removed after)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
    tmp = output_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for rank, rng in enumerate(rng_states):
        torch.save(rng, tmp / f"rng_state_{rank}.pth")
    atomic_write_json(tmp / "run_config.json", run_config)
    atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
    replace_dir(tmp, final)
    if save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return the trainer state."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, path, strict=False) if not (
            path / "model.safetensors"
        ).is_file() else model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{rank}.pth"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return load_trainer_state(path)
