"""Take a trained checkpoint to a registered (and optionally served) production model.

Stages, each a real CLI run as a subprocess, each recorded in OUTPUT_DIR/pipeline_state.json:
  merge (merge_qlora.py) -> evaluate (evaluate.py) -> gate -> export_mlx (convert_to_mlx.py)
  -> evaluate_export (evaluate.py) -> register (model_registry.py)
  -> [--serve: serve (inference_server.py) -> monitor (health_monitor.py)] -> promote
The gate fails when accuracy < --min_accuracy or below the current production version's accuracy.
Promote sets production after a healthy served run (--serve), else staging.
Re-running skips finished stages; a failed stage stops the chain (exit 1) and the next run resumes there.
OUTPUT_DIR/pipeline_report.md shows stages, times and the accuracy table.

  python scripts/production_pipeline.py --checkpoint models/pokemon-gemma-lora \\
      --eval_dataset training_data/test.jsonl --min_accuracy 0.3 --serve
"""

import argparse
import signal
import sys
from pathlib import Path

from pokemon_gemma.config import load_settings_or_exit, setup_logging
from pokemon_gemma.pipeline import REPORT_FILE, STAGE_NAMES, PipelineConfig, PipelineError, run_pipeline


def main(argv=None) -> int:
    s = load_settings_or_exit()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="trained run folder with a LoRA adapter (merged first) or a full model folder",
    )
    p.add_argument(
        "--base_model",
        default=None,
        help="base model the adapter was trained on (default: adapter_config.json's base_model_name_or_path)",
    )
    p.add_argument(
        "--eval_dataset",
        default=s.test_dataset_path,
        help=f"held-out JSONL for both evaluations (env TEST_DATASET_PATH; default: {s.test_dataset_path!r})",
    )
    p.add_argument("--name", default="pokemon-gemma", help="registry name of the model (default: pokemon-gemma)")
    p.add_argument(
        "--min_accuracy",
        type=float,
        default=0.0,
        help="gate: fail (and register nothing) below this accuracy (0..1; default 0)",
    )
    p.add_argument(
        "--min_play_success",
        type=float,
        default=None,
        help="play gate: the merged model plays --play_episodes demo-world episodes; fail below this share of "
        "goals done (0..1; default: no play stage)",
    )
    p.add_argument("--play_episodes", type=int, default=20, help="episodes of the play gate (default 20)")
    p.add_argument(
        "--serve",
        action="store_true",
        help="start the inference server, run the health monitor, promote to production when healthy",
    )
    p.add_argument("--keep_serving", action="store_true", help="with --serve: leave the server running at the end")
    p.add_argument(
        "--output_dir",
        default="models/pipeline",
        help="state, logs, merged/MLX folders, evaluations and the report (default: models/pipeline)",
    )
    p.add_argument(
        "--registry_db", default=s.registry_db, help=f"SQLite registry (env REGISTRY_DB; default: {s.registry_db!r})"
    )
    p.add_argument("--host", default=s.host, help=f"server bind address (env HOST; default: {s.host!r})")
    p.add_argument("--port", type=int, default=s.port, help=f"server port for --serve (env PORT; default: {s.port})")
    p.add_argument("--eval_limit", type=int, default=None, help="evaluate only the first N samples (quick runs)")
    p.add_argument(
        "--export_eval_limit",
        type=int,
        default=None,
        help="evaluate the MLX export on only the first N samples (MLX scores one sample at a time; "
        "default: --eval_limit)",
    )
    p.add_argument(
        "--eval_batch_size", type=int, default=8, help="samples per model call in the evaluations (default 8)"
    )
    p.add_argument(
        "--merge_dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="dtype of the merged weights (merge_qlora.py --dtype; default bf16)",
    )
    p.add_argument(
        "--mlx_bits",
        choices=("4", "8", "none"),
        default="4",
        help="MLX export quantisation (convert_to_mlx.py --quantization_bits; default 4)",
    )
    p.add_argument(
        "--mlx_verify_samples",
        type=int,
        default=32,
        help="samples the MLX export is verified on: --eval_dataset's first records, topped up with fixed demo "
        "samples (default: 32; with fewer, one disagreement decides the 90%% agreement gate)",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="register also logs the version as a W&B model artifact (WANDB_MODE=offline works)",
    )
    p.add_argument("--monitor_checks", type=int, default=3, help="health checks that must pass before promotion")
    p.add_argument(
        "--skip_stages",
        default="",
        help=f"comma-separated stages to skip, e.g. export_mlx,evaluate_export (stages: {', '.join(STAGE_NAMES)})",
    )
    p.add_argument("--stage_timeout", type=float, default=3600.0, help="seconds one stage may run (default 3600)")
    p.add_argument(
        "--restart", action="store_true", help="forget the recorded state in --output_dir and run every stage"
    )
    args = p.parse_args(argv)
    setup_logging(s)

    cfg = PipelineConfig(
        checkpoint=args.checkpoint,
        eval_dataset=args.eval_dataset,
        output_dir=args.output_dir,
        name=args.name,
        base_model=args.base_model,
        min_accuracy=args.min_accuracy,
        min_play_success=args.min_play_success,
        play_episodes=args.play_episodes,
        serve=args.serve,
        keep_serving=args.keep_serving,
        port=args.port,
        host=args.host,
        registry_db=args.registry_db,
        eval_limit=args.eval_limit,
        export_eval_limit=args.export_eval_limit,
        eval_batch_size=args.eval_batch_size,
        monitor_checks=args.monitor_checks,
        merge_dtype=args.merge_dtype,
        mlx_bits=args.mlx_bits,
        mlx_verify_samples=args.mlx_verify_samples,
        wandb=args.wandb,
        stage_timeout_s=args.stage_timeout,
        skip_stages=tuple(x.strip() for x in args.skip_stages.split(",") if x.strip()),
    )
    report = Path(args.output_dir).resolve() / REPORT_FILE
    # SIGTERM unwinds like Ctrl-C: the state records the stage, a server this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_pipeline(cfg, restart=args.restart)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if report.is_file():
            print(f"report: {report}", file=sys.stderr)
        return exc.code
    print(f"pipeline finished; report: {report}")
    return 0
