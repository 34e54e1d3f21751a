"""W&B sweep definition: offline validation against the real training parser, and the setup CLI."""

import os
import subprocess
import sys

import pytest

from pokemon_gemma.sweeps import load_sweep, training_parser, validate_sweep
from tests.conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "setup_wandb.py")
CONFIG = REPO_ROOT / "wandb_config.yaml"


def setup_cli(*args, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "WANDB_API_KEY"}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120, cwd=REPO_ROOT
    )


def test_repo_sweep_is_valid_and_every_value_parses_with_the_training_cli():
    sweep = load_sweep(CONFIG)
    assert validate_sweep(sweep) == []
    cfg = sweep.config
    assert cfg["program"] == "scripts/sft_pokemon_gemma3.py"
    assert cfg["metric"] == {"name": "eval/accuracy", "goal": "maximize"}
    assert {"learning_rate", "lora_r", "lora_alpha", "batch_size", "grad_accum", "warmup_ratio", "frame_layout"} <= set(
        cfg["parameters"]
    )
    # What `wandb agent` would pass (--name=value) is accepted by the real parser with the right type.
    parser = training_parser()
    for name, spec in cfg["parameters"].items():
        values = spec.get("values") or [spec.get("value")] if "min" not in spec else [spec["min"], spec["max"]]
        for value in values:
            parsed = getattr(parser.parse_args([f"--{name}={value}"]), name)
            assert str(parsed) == str(value) or float(parsed) == float(value)


@pytest.mark.slow  # CLI subprocess (imports the training stack)
def test_validate_cli_passes_on_the_repo_config():
    out = setup_cli("--validate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: ") and "8 parameters" in out.stdout


@pytest.fixture(scope="module")
def parser():
    return training_parser()


def plant(tmp_path, old, new):
    text = CONFIG.read_text()
    assert old in text
    bad = tmp_path / "sweep.yaml"
    bad.write_text(text.replace(old, new, 1))
    return bad


@pytest.mark.parametrize(
    "old,new,expected,line_has",
    [
        ("  lora_r:", "  lora_rank:", "'lora_rank' is not a flag of scripts/sft_pokemon_gemma3.py", "lora_rank:"),
        ("values: [1, 2]", "values: [1, 2.5]", "value 2.5 is not a valid int for --batch_size", "batch_size:"),
        (
            "values: [images, grid]",
            "values: [images, mosaic]",
            "'mosaic' is not one of --frame_layout's choices",
            "frame_layout:",
        ),
        ("min: 1.0e-5", "min: 1e-5", "min/max must be numbers", "learning_rate:"),
        (
            "  lora_alpha:\n    values: [16, 32, 64]",
            "  lora_alpha:\n    min: 8\n    max: 64\n    distribution: uniform",
            "samples floats but --lora_alpha takes int",
            "lora_alpha:",
        ),
        (
            "  frame_layout:",
            "  use_qlora:\n    values: [true, false]\n  frame_layout:",
            "--use_qlora is a switch",
            "use_qlora:",
        ),
        ("name: eval/accuracy", "name: eval/acc", "metric must be name: eval/accuracy", "metric:"),
    ],
)
def test_validate_fails_on_planted_mistakes_naming_file_and_line(tmp_path, parser, old, new, expected, line_has):
    bad = plant(tmp_path, old, new)
    errors = validate_sweep(load_sweep(bad), parser)
    hits = [e for e in errors if expected in e]
    assert len(errors) == 1 and hits, errors
    line_no = int(hits[0].split(":")[2])
    assert hits[0].startswith(f"error: {bad}:")
    assert line_has in bad.read_text().splitlines()[line_no - 1]


@pytest.mark.slow  # CLI subprocess (imports the training stack)
def test_validate_cli_fails_on_unknown_parameter_and_wrong_type(tmp_path):
    bad = plant(
        tmp_path, "  lora_r:\n    values: [8, 16, 32]", "  lora_rank:\n    values: [8]\n  lora_r:\n    values: [8, 1.5]"
    )
    out = setup_cli("--validate", "--config", str(bad))
    assert out.returncode == 1 and out.stdout == ""
    assert (
        "parameter 'lora_rank' is not a flag" in out.stderr
        and "value 1.5 is not a valid int for --lora_r" in out.stderr
    )
    assert "2 problem(s)" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # 2 CLI subprocesses
def test_create_sweep_without_key_is_one_clear_line_and_dry_run_needs_none():
    out = setup_cli("--create-sweep")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --create-sweep needs WANDB_API_KEY in .env or the environment "
        "(https://wandb.ai/authorize; --dry_run shows the sweep without it)"
    ]
    dry = setup_cli("--create-sweep", "--dry_run", "--wandb_project", "pg-test", "--wandb_entity", "team")
    assert dry.returncode == 0
    assert '"program": "scripts/sft_pokemon_gemma3.py"' in dry.stdout
    assert "wandb agent team/pg-test/<sweep_id>" in dry.stdout


ACCELERATE_COMMAND = """command:
  - ${env}
  - ${interpreter}
  - -m
  - accelerate.commands.launch
  - --config_file
  - CONFIG
  - ${program}
  - ${args}
"""


@pytest.mark.parametrize(
    "config,expected",
    [
        ("accelerate_configs/multi_gpu.yaml", None),
        ("accelerate_configs/fsdp.yaml", None),
        ("accelerate_configs/nope.yaml", "accelerate config accelerate_configs/nope.yaml does not exist"),
    ],
)
def test_multi_gpu_sweep_command_through_accelerate_launch(tmp_path, parser, config, expected):
    """A sweep whose runs each use several GPUs: the agent starts `accelerate launch ... ${program} ${args}`."""
    text = CONFIG.read_text()
    start, end = text.index("\ncommand:") + 1, text.index("\nearly_terminate:") + 1
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text[:start] + ACCELERATE_COMMAND.replace("CONFIG", config) + text[end:])
    errors = validate_sweep(load_sweep(sweep), parser)
    if expected is None:
        assert errors == []
    else:
        assert len(errors) == 1 and expected in errors[0] and errors[0].startswith(f"error: {sweep}:")
        assert "command:" in sweep.read_text().splitlines()[int(errors[0].split(":")[2]) - 1]
