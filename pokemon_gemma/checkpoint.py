"""Checkpoints that resume bit-exactly: weights (adapter or model), optimizer, scheduler, RNG
states of every process, data position and step. Written to a temp folder, then renamed.

A checkpoint is read completely (and so verified) before anything is restored: `--resume_from_checkpoint
latest` skips damaged checkpoints (naming each and why) and resumes from the newest intact one. Under
FSDP2/DeepSpeed the gathered trainable weights are also kept as `trainable_state.pt` (FQN keys) and
DeepSpeed's own partitioned files as `deepspeed/`; `trainer_state.json` records which kind wrote it.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import first_line
from .fileio import atomic_write_json, staged_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable_state.pt"
ENGINE_DIR = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or restored; the message names the folder and what is wrong."""


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


def save_weights(model, path: Path, processor=None, state_dict: dict | None = None) -> None:
    """The adapter (PEFT) or the full model, plus the processor when given. `state_dict`: weights
    gathered from a sharded model (FQN keys); PEFT's save_pretrained keeps and renames the adapter's."""
    if state_dict is not None:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    else:
        model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer_state: dict | None,
    scheduler,
    state: dict[str, Any],
    run_config: dict[str, Any],
    rng_states: list[dict[str, Any]],
    save_total_limit: int,
    *,
    trainable_state: dict | None = None,
    engine_dir: Path | None = None,
) -> Path:
    """Write checkpoint-{step}/ atomically and drop the oldest beyond `save_total_limit`.

    `optimizer_state` is None under DeepSpeed, whose engine wrote `engine_dir` (moved in as deepspeed/).
    A failed write (a full disk) leaves no temp folder and the earlier checkpoints untouched."""
    final = output_dir / f"checkpoint-{step}"
    try:
        with staged_dir(final, tag="tmp") as tmp:
            save_weights(model, tmp, state_dict=trainable_state)
            if trainable_state is not None:
                torch.save(trainable_state, tmp / TRAINABLE_FILE)
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            if engine_dir is not None:
                Path(engine_dir).rename(tmp / ENGINE_DIR)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng_state_{rank}.pth")
            atomic_write_json(tmp / "run_config.json", run_config)
            atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
    except (OSError, RuntimeError) as exc:
        if engine_dir is not None:
            shutil.rmtree(engine_dir, ignore_errors=True)
        raise CheckpointError(explain_write_error(exc, final)) from None
    if save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or (torch.save reports a short write only as
    'unexpected pos N vs M') next to no free space left where it was writing."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(_existing_parent(folder)).free < (1 << 20)
    except OSError:
        return False


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def explain_write_error(exc: BaseException, folder: Path) -> str:
    """One line for a failed save, naming the disk when it is full (the temp folder is already gone)."""
    if disk_full(exc, folder):
        where = _existing_parent(Path(folder).parent)
        free = shutil.disk_usage(where).free
        return (
            f"no space left on the disk holding {where} while writing {Path(folder).name} "
            f"({free // 1024} KiB free; nothing partial was kept, earlier checkpoints are intact): "
            "free some space, then resume with --resume_from_checkpoint latest"
        )
    return f"could not write {folder}: {first_line(exc)}"


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read into memory (so it is known to be intact) before restoring."""

    path: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]  # adapter or full-model tensors, as saved (safetensors)
    trainable: dict[str, torch.Tensor] | None  # FQN-keyed trainable weights (FSDP/DeepSpeed checkpoints)
    optimizer: dict | None  # None for DeepSpeed (its engine reads deepspeed/)
    scheduler: dict
    rng: dict | None
    engine_dir: Path | None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _load(path: Path, what: str, loader):
    if not path.exists():
        raise CheckpointError(f"{what} is missing")
    try:
        return loader(path)
    except Exception as exc:  # noqa: BLE001 - any decoding error means a damaged file
        raise CheckpointError(f"{what} is damaged ({first_line(exc, 160)})") from None


def _torch_load(path: Path):
    return torch.load(path, weights_only=False, map_location="cpu")


def _read_state(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("no integer 'step'")
    return state


def read_checkpoint(path: str | Path, rank: int, kind: str = "ddp") -> Checkpoint:
    """Read and check every file this process needs from a checkpoint folder, for a run of `kind`
    ('ddp', 'fsdp' or 'deepspeed'); raises CheckpointError('<file> is missing/damaged (...)')."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("not a folder")
    state = _load(path / STATE_FILE, STATE_FILE, _read_state)
    written_by = state.get("distributed", "ddp")
    if written_by != kind:  # the optimizer/engine files differ in layout between kinds
        raise CheckpointError(f"written by a {written_by} run; resume it with the same kind of launch, not {kind}")
    files = sorted(path.glob("*.safetensors"))
    names = [p.name for p in files] or ["adapter_model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        weights.update(_load(path / name, name, load_file))
    trainable = _load(path / TRAINABLE_FILE, TRAINABLE_FILE, _torch_load) if kind != "ddp" else None
    optimizer = _load(path / "optimizer.pt", "optimizer.pt", _torch_load) if kind != "deepspeed" else None
    engine_dir = None
    if kind == "deepspeed":
        engine_dir = path / ENGINE_DIR
        if not (engine_dir / "ds").is_dir() or not any((engine_dir / "ds").iterdir()):
            raise CheckpointError(f"{ENGINE_DIR}/ds (DeepSpeed's own files) is missing")
    scheduler = _load(path / "scheduler.pt", "scheduler.pt", _torch_load)
    rng_file = path / f"rng_state_{rank}.pth"
    rng = _load(rng_file, rng_file.name, _torch_load) if rng_file.exists() else None
    return Checkpoint(path, state, weights, trainable, optimizer, scheduler, rng, engine_dir)


def find_resume_checkpoint(
    resume_from: str, output_dir: Path, rank: int, kind: str
) -> tuple[Checkpoint | None, list[str]]:
    """('latest' or a folder) -> (the checkpoint to resume from, or None for a fresh start; one line per
    damaged checkpoint that was skipped). An explicit folder that is damaged, or a run folder whose every
    checkpoint is damaged, raises CheckpointError."""
    if resume_from != "latest":
        try:
            return read_checkpoint(resume_from, rank, kind), []
        except CheckpointError as exc:
            raise CheckpointError(f"--resume_from_checkpoint {resume_from}: {exc}") from None
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return read_checkpoint(path, rank, kind), skipped
        except CheckpointError as exc:
            skipped.append(f"skipped {path}: {exc}")
    if skipped:
        raise CheckpointError(
            f"every checkpoint in {output_dir} is damaged ({'; '.join(s.split(': ', 1)[1] for s in skipped)}); "
            "remove them to start from scratch"
        )
    return None, []


# ------------------------------------------------------------------------------------------ restoring
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


def load_full_weights(model, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a full-model checkpoint strictly: every parameter but the tied ones must be in the files."""
    from safetensors.torch import load_file

    if state is None:
        state = {}
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


def restore(ckpt: Checkpoint, model, optimizer, scheduler, strategy=None) -> dict[str, Any]:
    """Put a read checkpoint into this run (weights, optimizer, scheduler, this process's RNG); returns
    the trainer state. `model` is the unwrapped module for DDP, the prepared one under FSDP/DeepSpeed."""
    from peft import PeftModel, set_peft_model_state_dict

    if strategy is not None and strategy.sharded:
        strategy.restore(model, optimizer, ckpt.trainable, ckpt.optimizer, ckpt.engine_dir)
    else:
        if isinstance(model, PeftModel):
            set_peft_model_state_dict(model, ckpt.weights)
        else:
            load_full_weights(model, ckpt.path, ckpt.weights)
        optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    if ckpt.rng is not None:
        set_rng_state(ckpt.rng)
    return ckpt.state


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())
