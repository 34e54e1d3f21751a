"""Every file and folder the stages write is readable by the group and others under umask 022
(0644 / 0755), like any ordinary file: a teammate or a serving user can read models, data and
reports. Temp-file-then-rename writers (mkstemp makes 0600) must not leak their temp mode."""

import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# One file per stage, so the check cannot pass on a flow that wrote nothing.
EXPECTED = [
    "sessions/demo_manifest.json",
    "data/train.jsonl",
    "data/summary.json",
    "run/adapter_model.safetensors",
    "run/run_config.json",
    "run/metrics.jsonl",
    "run/checkpoint-2/optimizer.pt",
    "run/checkpoint-2/trainer_state.json",
    "run/best/adapter_model.safetensors",
    "run/training_curves.png",
    "eval/eval_report.json",
    "eval/predictions.jsonl",
    "eval/confusion_matrix.png",
    "merged/model.safetensors",
    "merged/merge_manifest.json",
    "merged/tokenizer.json",
    "registry/registry.db",
    "v1.json",
]


@pytest.mark.slow  # trains, merges, exports in a subprocess
def test_every_file_the_stages_write_is_group_and_other_readable(tiny_model_dir, tmp_path):
    out = tmp_path / "flow"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "file_modes_flow.py"), str(tiny_model_dir), str(out)],
        cwd=tmp_path,  # no developer .env
        env=env,
        umask=0o022,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    expected = EXPECTED + (
        ["mlx/model.safetensors", "mlx/export_manifest.json"] if "export skipped" not in proc.stdout else []
    )
    missing = [name for name in expected if not (out / name).is_file()]
    assert missing == []

    not_readable = []
    for path in sorted(out.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        need = 0o055 if stat.S_ISDIR(mode) else 0o044  # folders: read + enter; files: read
        if mode & need != need:
            not_readable.append(f"{stat.filemode(mode)} {path.relative_to(out)}")
    assert not_readable == [], "\n".join(not_readable)
    assert sum(1 for p in out.rglob("*") if p.is_file()) > len(expected)
