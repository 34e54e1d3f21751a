"""W&B sweep definition checks (offline) and creation.

`validate_sweep` compares every sweep parameter with the training script's real argparse parser
(`pokemon_gemma.train.build_arg_parser`): the flag must exist, and every value the sweep can
produce must survive that flag's own type conversion and choices, the way `wandb agent` passes it
(`--name=value`). Nothing here needs network access or a W&B key.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_PROGRAM = "scripts/sft_pokemon_gemma3.py"
METRIC = "eval/accuracy"
METHODS = ("grid", "random", "bayes")
SPEC_KEYS = {"value", "values", "distribution", "min", "max", "mu", "sigma", "q", "probabilities"}
INT_DISTRIBUTIONS = {"int_uniform"}
FLOAT_DISTRIBUTIONS = {
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform",
    "q_log_uniform_values",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
}
POSITIVE_MIN = {"log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"}


class SweepError(ValueError):
    """The sweep file cannot be read; the message is `file:line: what (how to fix)`."""


@dataclass
class SweepFile:
    path: Path
    config: dict[str, Any]
    lines: dict[str, int]  # top-level key or "parameters.NAME" -> 1-based line

    def line(self, key: str) -> int:
        return self.lines.get(key, 1)


def load_sweep(path: str | Path) -> SweepFile:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found (pass --config wandb_config.yaml)")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SweepError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path}:1: expected a mapping with program, metric and parameters")
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        lines[key_node.value] = key_node.start_mark.line + 1
        if key_node.value == "parameters" and isinstance(value_node, yaml.MappingNode):
            for pk, _ in value_node.value:
                lines[f"parameters.{pk.value}"] = pk.start_mark.line + 1
    return SweepFile(path, config, lines)


def training_parser() -> argparse.ArgumentParser:
    """The real parser of scripts/sft_pokemon_gemma3.py, built from defaults (no .env needed)."""
    from pokemon_gemma.config import Settings
    from pokemon_gemma.train import build_arg_parser

    return build_arg_parser(Settings())


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        opt[2:]: action
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and action.dest != "help"
    }


def _check_value(flag: str, action: argparse.Action, value: Any) -> str | None:
    """Why `--flag=value` would be rejected by the training parser, or None if it parses."""
    if action.nargs == 0:  # boolean switch: wandb would pass --flag=True, which it refuses
        return None if isinstance(value, bool) else f"--{flag} is a switch; values must be true/false"
    if isinstance(value, (dict, list)):
        return f"value {value!r} for --{flag} is a {type(value).__name__}, not a single value"
    text = str(value)
    convert = action.type or str
    try:
        converted = convert(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return f"value {value!r} is not a valid {getattr(convert, '__name__', 'value')} for --{flag}"
    if action.choices is not None and converted not in action.choices:
        return f"value {value!r} is not one of --{flag}'s choices ({', '.join(map(str, action.choices))})"
    return None


def _check_parameter(
    name: str, spec: Any, flags: dict[str, argparse.Action], boolean_ok: bool, method: str
) -> list[str]:
    if name not in flags:
        near = sorted(f for f in flags if f.startswith(name[:3]))
        hint = f"did you mean {', '.join('--' + n for n in near)}?" if near else f"see {TRAINING_PROGRAM} --help"
        return [f"parameter {name!r} is not a flag of {TRAINING_PROGRAM} ({hint})"]
    action = flags[name]
    if not isinstance(spec, dict):
        return [f"parameter {name!r} must be a mapping with value, values or distribution/min/max"]
    problems = [
        f"parameter {name!r}: unknown key {k!r} (allowed: {', '.join(sorted(SPEC_KEYS))})"
        for k in spec
        if k not in SPEC_KEYS
    ]
    if action.nargs == 0 and not boolean_ok:
        problems.append(
            f"parameter {name!r}: --{name} is a switch and wandb passes --{name}=True, which the "
            "script refuses (use ${args_no_boolean_flags} in command)"
        )
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            return problems + [f"parameter {name!r}: values must be a non-empty list"]
        candidates = spec["values"]
    elif "value" in spec:
        candidates = [spec["value"]]
    elif "min" in spec and "max" in spec:
        lo, hi = spec["min"], spec["max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            return problems + [
                f"parameter {name!r}: min/max must be numbers, got {lo!r}/{hi!r} "
                "(YAML reads 1e-5 as text: write 1.0e-5)"
            ]
        dist = spec.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
        if dist not in INT_DISTRIBUTIONS | FLOAT_DISTRIBUTIONS:
            return problems + [f"parameter {name!r}: unknown distribution {dist!r}"]
        if lo >= hi:
            problems.append(f"parameter {name!r}: min {lo} is not below max {hi}")
        if dist in POSITIVE_MIN and lo <= 0:
            problems.append(f"parameter {name!r}: {dist} needs min > 0")
        if dist in FLOAT_DISTRIBUTIONS and action.type is int:
            problems.append(
                f"parameter {name!r}: distribution {dist} samples floats but --{name} takes int "
                "(use int_uniform or values)"
            )
        if method == "grid":
            problems.append(f"parameter {name!r}: grid search needs values, not a {dist} range")
        candidates = [lo, hi]
    else:
        return problems + [f"parameter {name!r}: give value, values, or min and max"]
    for value in candidates:
        why = _check_value(name, action, value)
        if why:
            problems.append(f"parameter {name!r}: {why}")
    return problems


def validate_sweep(sweep: SweepFile, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Every problem as `error: file:line: what (how to fix)`; an empty list means the sweep is runnable."""
    cfg, path = sweep.config, sweep.path
    errors: list[str] = []

    def err(key: str, message: str) -> None:
        errors.append(f"error: {path}:{sweep.line(key)}: {message}")

    program = cfg.get("program")
    if program != TRAINING_PROGRAM:
        err("program", f"program is {program!r}; the sweep must run {TRAINING_PROGRAM}")
    elif not (REPO_ROOT / program).is_file():
        err("program", f"{program} does not exist in {REPO_ROOT}")
    method = cfg.get("method", "random")
    if method not in METHODS:
        err("method", f"method {method!r} is not one of {', '.join(METHODS)}")
    metric = cfg.get("metric") or {}
    if not isinstance(metric, dict) or metric.get("name") != METRIC or metric.get("goal") != "maximize":
        err("metric", f"metric must be name: {METRIC}, goal: maximize (got {metric!r})")
    else:
        from pokemon_gemma import train

        if f'"{METRIC}"' not in inspect.getsource(train):
            err("metric", f"pokemon_gemma/train.py never logs {METRIC!r}; the sweep would have nothing to maximise")
    command = cfg.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    boolean_ok = any("${args_no_boolean_flags}" in str(part) for part in command)
    for problem in check_command(command):
        err("command", problem)
    params = cfg.get("parameters")
    if not isinstance(params, dict) or not params:
        err("parameters", "no parameters to sweep")
        return errors
    flags = _flags(parser or training_parser())
    for name, spec in params.items():
        for problem in _check_parameter(str(name), spec, flags, boolean_ok, method):
            err(f"parameters.{name}", problem)
    if "report_to" not in params:
        err("parameters", "add `report_to: {value: wandb}` so each run logs eval/accuracy to W&B")
    return errors


def check_command(command: list) -> list[str]:
    """The sweep's `command`: `${program}` and its `${args}` must be there; a command that starts the
    training through `accelerate launch` (several GPUs per run) must name a config that accelerate's
    own loader reads (each rank then sees the same WANDB_RUN_ID, and only rank 0 opens the W&B run)."""
    parts = [str(p) for p in command]
    problems = []
    if "${program}" not in parts:
        problems.append("command must run ${program}")
    elif not any(p in ("${args}", "${args_no_boolean_flags}") for p in parts[parts.index("${program}") :]):
        problems.append("command must pass ${args} (or ${args_no_boolean_flags}) after ${program}")
    launch = next(
        (i for i, p in enumerate(parts) if p == "accelerate.commands.launch" or p.endswith("accelerate")), None
    )
    if launch is None:
        return problems
    if "${program}" in parts and parts.index("${program}") < launch:
        problems.append("accelerate launch must come before ${program}")
    config = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "--config_file"), None)
    if config is None:
        return problems + ["accelerate launch needs --config_file accelerate_configs/<name>.yaml"]
    path = REPO_ROOT / config
    if not path.is_file():
        return problems + [f"accelerate config {config} does not exist in {REPO_ROOT}"]
    try:
        from accelerate.commands.config import load_config_from_file

        load_config_from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - accelerate's loader: unknown keys, bad YAML
        problems.append(f"accelerate cannot load {config} ({str(exc).splitlines()[0][:160]})")
    return problems


def agent_command(sweep_id: str, project: str, entity: str | None) -> str:
    path = "/".join(p for p in (entity, project, sweep_id) if p)
    return f"wandb agent {path}"


def create_sweep(sweep: SweepFile, project: str, entity: str | None) -> str:
    """Create the sweep on the W&B server; returns its id."""
    import wandb

    return wandb.sweep(sweep=sweep.config, project=project, entity=entity or None)
