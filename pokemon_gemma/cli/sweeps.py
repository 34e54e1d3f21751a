"""Check the W&B sweep definition against the training script's flags (offline) and create the sweep.

  setup_wandb.py --validate                 # offline: every parameter is a real flag with valid values
  setup_wandb.py --create-sweep --dry_run   # print what would be created, no key or network needed
  setup_wandb.py --create-sweep             # create it on W&B (WANDB_API_KEY in .env) and print `wandb agent ...`

With no action flag it validates. Exit codes: 0 ok, 1 invalid sweep or W&B failure, 2 usage / no key.
"""

import argparse
import json
import os
import sys

from pokemon_gemma.config import add_settings_args, load_settings_or_exit, settings_from_args, setup_logging
from pokemon_gemma.errors import first_line
from pokemon_gemma.sweeps import REPO_ROOT, SweepError, agent_command, create_sweep, load_sweep, validate_sweep


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=str(REPO_ROOT / "wandb_config.yaml"),
        help="sweep definition (default: wandb_config.yaml at the repo root)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="check every sweep parameter against scripts/sft_pokemon_gemma3.py's flags and types",
    )
    parser.add_argument(
        "--create-sweep",
        dest="create_sweep",
        action="store_true",
        help="create the sweep on W&B (needs WANDB_API_KEY) and print the agent command",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the sweep that would be created; create nothing")
    add_settings_args(parser, settings, ["wandb_project", "wandb_entity"])
    args = parser.parse_args(argv)
    settings = settings_from_args(settings, args)
    setup_logging(settings)

    try:
        sweep = load_sweep(args.config)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    errors = validate_sweep(sweep)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        print(f"{sweep.path}: {len(errors)} problem(s); fix them before creating the sweep", file=sys.stderr)
        return 1
    params = sweep.config["parameters"]
    print(
        f"ok: {sweep.path}: {len(params)} parameters are flags of {sweep.config['program']} with valid values "
        f"({', '.join(params)}); metric {sweep.config['metric']['name']} ({sweep.config['metric']['goal']})"
    )
    if not (args.create_sweep or args.dry_run):
        return 0

    where = "/".join(p for p in (settings.wandb_entity, settings.wandb_project) if p)
    if args.dry_run:
        print(f"would create this sweep in W&B project {where}:")
        print(json.dumps(sweep.config, indent=2))
        print(f"then start agents with: {agent_command('<sweep_id>', settings.wandb_project, settings.wandb_entity)}")
        return 0
    key = settings.wandb_api_key or os.environ.get("WANDB_API_KEY", "")
    if not key:
        print(
            "error: --create-sweep needs WANDB_API_KEY in .env or the environment "
            "(https://wandb.ai/authorize; --dry_run shows the sweep without it)",
            file=sys.stderr,
        )
        return 2
    os.environ["WANDB_API_KEY"] = key  # wandb reads it from here; never printed
    try:
        sweep_id = create_sweep(sweep, settings.wandb_project, settings.wandb_entity)
    except Exception as exc:  # noqa: BLE001 - any W&B/network failure becomes one line
        first = first_line(exc)
        print(f"error: could not create the sweep on W&B: {first} (check the key and network)", file=sys.stderr)
        return 1
    print(f"created sweep {sweep_id} in {where}")
    print(f"start agents with: {agent_command(sweep_id, settings.wandb_project, settings.wandb_entity)}")
    return 0
