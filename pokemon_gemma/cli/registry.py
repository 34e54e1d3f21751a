"""Model registry: register, list, show, promote, roll back, delete and export model versions.

Examples:
  model_registry.py register --name pokemon-gemma --checkpoint models/pokemon-gemma-merged \
      --metrics eval/eval_report.json
  model_registry.py list --json
  model_registry.py show pokemon-gemma:2
  model_registry.py promote pokemon-gemma --version 2 --stage production
  model_registry.py rollback pokemon-gemma

Exit codes: 0 ok, 1 failure (including `show` finding files that no longer match their sha256), 2 usage.
"""

import argparse
import json
import sys

from pokemon_gemma.config import add_settings_args, load_settings_or_exit, settings_from_args, setup_logging
from pokemon_gemma.registry import STAGES, DuplicateWeightsError, Registry, RegistryError, log_to_wandb, parse_tags


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(parser, settings, ["registry_db"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("register", help="add a new version of a model")
    p.add_argument("--name", required=True, help="model name (versions count up per name)")
    p.add_argument("--checkpoint", required=True, help="folder with the weights (adapter, merged or MLX folder)")
    p.add_argument("--metrics", help="eval_report.json whose scalar metrics are attached to the version")
    p.add_argument("--tags", nargs="*", default=[], metavar="KEY=VALUE", help="free-form tags, e.g. run=demo")
    p.add_argument("--base_model", help="base model id (default: read from adapter_config.json / manifests)")
    p.add_argument(
        "--on_duplicate",
        choices=("error", "reuse", "allow"),
        default="error",
        help="same weights already registered under this name: fail (default), return that version, or register again",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log the version as a W&B model artifact (WANDB_MODE=offline works; failures only warn)",
    )
    add_settings_args(p, settings, ["wandb_project", "wandb_entity", "wandb_mode"])
    p.add_argument("--json", action="store_true", help="print the new version as one JSON object")

    p = sub.add_parser("list", help="list versions")
    p.add_argument("--name", help="only this model")
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")

    p = sub.add_parser("show", help="one version in full; re-hashes its files and flags changes")
    p.add_argument("ref", metavar="NAME[:VERSION]", help="model name, optionally :VERSION (default: latest)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = sub.add_parser("promote", help="move a version to a stage (one production version per name)")
    p.add_argument("name", help="model name")
    p.add_argument("--version", type=int, required=True, help="version number")
    p.add_argument("--stage", choices=[s for s in STAGES if s != "none"], required=True, help="target stage")
    p.add_argument("--note", default="promoted", help="why (kept in the stage history)")

    p = sub.add_parser("rollback", help="production goes back to the previous production version")
    p.add_argument("name", help="model name")

    p = sub.add_parser("delete", help="remove a version's record (files are left alone)")
    p.add_argument("name", help="model name")
    p.add_argument("--version", type=int, required=True, help="version number")

    p = sub.add_parser("export", help="write one version's full record (with integrity check) to JSON")
    p.add_argument("name", help="model name")
    p.add_argument("--version", type=int, required=True, help="version number")
    p.add_argument("--output", required=True, help="JSON file to write")
    return parser


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, sep, version = ref.partition(":")
    version = version.lstrip("v")
    if sep and not version.isdigit():
        print(f"error: {ref!r}: version must be a number, e.g. {name}:3", file=sys.stderr)
        raise SystemExit(2)
    return name, (int(version) if sep else None)


def _fmt_metrics(metrics: dict) -> str:
    acc = metrics.get("accuracy")
    return f"{acc:.4f}" if isinstance(acc, (int, float)) else "-"


def print_table(versions) -> None:
    if not versions:
        print("(no versions registered)")
        return
    header = f"{'name':<24} {'ver':>4} {'stage':<11} {'accuracy':>8} {'size MB':>8}  {'sha256':<12}  created"
    print(header)
    for v in versions:
        print(
            f"{v.name:<24} {v.version:>4} {v.stage:<11} {_fmt_metrics(v.metrics):>8} "
            f"{v.size_bytes / 1e6:>8.2f}  {v.sha256[:12]}  {v.created_at}"
        )


def print_version(v, integrity: dict) -> None:
    print(f"{v.ref}  stage={v.stage}")
    for key in (
        "path",
        "sha256",
        "size_bytes",
        "base_model",
        "dataset_path",
        "dataset_sha256",
        "git_commit",
        "created_at",
        "created_by",
    ):
        print(f"  {key:<15} {getattr(v, key)}")
    print(f"  {'metrics':<15} {json.dumps(v.metrics)}")
    print(f"  {'tags':<15} {json.dumps(v.tags)}")
    recorded = f"recorded ({len(v.training_config)} keys)" if v.training_config else "none"
    print(f"  {'training cfg':<15} {recorded}")
    print("  stage history:")
    for h in v.history:
        print(f"    {h['at']}  {h['from_stage'] or '-'} -> {h['to_stage']}  by {h['who']}  ({h['note']})")
    if integrity["status"] == "ok":
        print("  integrity       ok (files match their sha256)")
    else:
        bad = ", ".join(integrity["changed"] + [f"{m} (missing)" for m in integrity["missing"]])
        print(f"  integrity       {integrity['status'].upper()}: {bad or integrity.get('detail', '')}")


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    settings = settings_from_args(settings, args)
    setup_logging(settings)
    try:
        with Registry(settings.registry_db) as reg:
            return run(reg, args, settings)
    except DuplicateWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(reg: Registry, args, settings) -> int:
    if args.command == "register":
        v, created = reg.register(
            args.name,
            args.checkpoint,
            metrics_path=args.metrics,
            tags=parse_tags(args.tags),
            base_model=args.base_model,
            on_duplicate=args.on_duplicate,
        )
        if args.wandb and created:
            where = log_to_wandb(
                v,
                project=settings.wandb_project,
                entity=settings.wandb_entity,
                mode=settings.wandb_mode,
                api_key=settings.wandb_api_key,
            )
            if where and not args.json:
                print(f"logged to W&B as model artifact {where}")
        if args.json:
            print(json.dumps({**v.summary(), "created": created}))
        elif created:
            print(
                f"registered {v.ref} ({v.size_bytes / 1e6:.2f} MB, sha256 {v.sha256[:12]}, "
                f"accuracy {_fmt_metrics(v.metrics)})"
            )
        else:
            print(f"already registered as {v.ref} (same sha256 {v.sha256[:12]})")
        return 0
    if args.command == "list":
        versions = reg.list_versions(args.name)
        if args.json:
            print(json.dumps([v.summary() for v in versions]))
        else:
            print_table(versions)
        return 0
    if args.command == "show":
        name, version = parse_ref(args.ref)
        v = reg.get(name, version)
        integrity = reg.verify(v)
        if args.json:
            print(json.dumps({**v.to_dict(), "integrity": integrity}))
        else:
            print_version(v, integrity)
        if integrity["status"] != "ok":
            print(
                f"error: {v.ref}: files at {v.path} no longer match the registered sha256 "
                f"({integrity['status']}; re-register the current files or restore them)",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.command == "promote":
        v = reg.promote(args.name, args.version, args.stage, note=args.note)
        print(f"{v.ref} is now {v.stage}")
        return 0
    if args.command == "rollback":
        old, new = reg.rollback(args.name)
        print(f"rolled back {args.name}: production is now v{new.version} (v{old.version} archived)")
        return 0
    if args.command == "delete":
        v = reg.delete(args.name, args.version)
        print(f"deleted {v.ref} from the registry (files at {v.path} left in place)")
        return 0
    if args.command == "export":
        path = reg.export(args.name, args.version, args.output)
        print(f"wrote {path}")
        return 0
    raise AssertionError(args.command)
