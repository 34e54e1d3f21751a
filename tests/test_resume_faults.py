"""Damaged checkpoints and a full disk: `--resume_from_checkpoint latest` falls back to the newest intact
checkpoint naming what it skipped; an explicit damaged checkpoint and a full disk during a save are one
`error:` line (exit 1), the full disk leaves no temp folder and the previous checkpoint intact."""

import os
import shutil
import subprocess
import sys

import pytest

from pokemon_gemma import checkpoint as ckpt
from tests.conftest import REPO_ROOT
from tests.helpers import fill_disk, small_tmpfs, write_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero(path):
    path.write_bytes(b"\0" * path.stat().st_size)


DAMAGE = {  # name -> (file in checkpoint-2, how, what the skip/error line says)
    "truncated_safetensors": ("adapter_model.safetensors", truncate, "adapter_model.safetensors is damaged"),
    "zeroed_safetensors": ("adapter_model.safetensors", zero, "adapter_model.safetensors is damaged"),
    "deleted_safetensors": ("adapter_model.safetensors", os.remove, "adapter_model.safetensors is missing"),
    "broken_optimizer": ("optimizer.pt", truncate, "optimizer.pt is damaged"),
    "garbage_trainer_state": (
        "trainer_state.json", lambda p: p.write_text("{not json"), "trainer_state.json is damaged"
    ),
}  # fmt: skip


def train_cmd(model, train, out, *extra):
    return [
        sys.executable, "scripts/sft_pokemon_gemma3.py", "--model_name", str(model), "--dataset_path", str(train),
        "--eval_dataset_path", "", "--output_dir", str(out), "--batch_size", "2", "--grad_accum", "1",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "1", "--seed", "7", *extra,
    ]  # fmt: skip


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A run with checkpoint-1 and checkpoint-2 (2 steps, one checkpoint per step)."""
    root = tmp_path_factory.mktemp("faults")
    train = write_dataset(root / "data", 8, seed=0)
    proc = run(train_cmd(tiny_model_dir, train, root / "run", "--max_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train, root / "run"


@pytest.fixture
def damaged(trained, tmp_path, request):
    train, run_dir = trained
    name, how, why = DAMAGE[request.param]
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    how(out / "checkpoint-2" / name)
    return train, out, why


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_reading_a_damaged_checkpoint_names_the_file(damaged):
    _, out, why = damaged
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.read_checkpoint(out / "checkpoint-2", rank=0)
    assert ckpt.read_checkpoint(out / "checkpoint-1", rank=0).step == 1
    found, skipped = ckpt.find_resume_checkpoint("latest", out, rank=0, kind="ddp")
    assert found.path == out / "checkpoint-1" and len(skipped) == 1 and why in skipped[0]


@pytest.mark.slow  # two training processes (~20 s each)
@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_resume_skips_a_damaged_latest_checkpoint_and_refuses_it_by_name(tiny_model_dir, damaged):
    train, out, why = damaged
    explicit = run(
        train_cmd(tiny_model_dir, train, out, "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    )
    assert one_error_line(explicit).startswith(f"error: --resume_from_checkpoint {out / 'checkpoint-2'}: {why}")
    latest = run(train_cmd(tiny_model_dir, train, out, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    assert latest.returncode == 0 and "Traceback" not in latest.stderr, latest.stderr[-3000:]
    assert f"skipped {out / 'checkpoint-2'}: {why}" in latest.stderr
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in latest.stderr
    assert ckpt.read_checkpoint(out / "checkpoint-2", rank=0).step == 2  # retrained and saved again


def test_every_checkpoint_damaged_is_one_error_not_a_fresh_start(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    for n in (1, 2):
        zero(out / f"checkpoint-{n}" / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"every checkpoint in .* is damaged \(optimizer.pt is damaged"):
        ckpt.find_resume_checkpoint("latest", out, rank=0, kind="ddp")


@pytest.mark.slow  # two training processes (~20 s each), a tmpfs mount
def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing_behind(tiny_model_dir, tmp_path):
    train = write_dataset(tmp_path / "data", 8, seed=0)
    with small_tmpfs(tmp_path / "disk", size_kb=8192) as disk:
        out = disk / "run"
        first = run(train_cmd(tiny_model_dir, train, out, "--max_steps", "1"))
        assert first.returncode == 0, first.stderr[-3000:]
        adapter = (out / "checkpoint-1" / "adapter_model.safetensors").stat().st_size
        # room for the next checkpoint's adapter but not its optimizer state: torch.save then fails with
        # "unexpected pos N vs M", which says nothing about disk space
        filler = fill_disk(disk, leave_bytes=adapter + 48 * 1024)
        proc = run(train_cmd(tiny_model_dir, train, out, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
        line = one_error_line(proc)
        assert line.startswith(f"error: no space left on the disk holding {out} while writing checkpoint-2"), line
        assert "resume with --resume_from_checkpoint latest" in line
        assert (
            sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
        )  # no temp folder keeps the disk full
        assert not (out / "checkpoint-2").exists()
        assert ckpt.read_checkpoint(out / "checkpoint-1", rank=0).step == 1  # the previous checkpoint survives
        filler.unlink()
        again = run(train_cmd(tiny_model_dir, train, out, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
        assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
        assert ckpt.read_checkpoint(out / "checkpoint-2", rank=0).step == 2
