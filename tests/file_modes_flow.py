"""Runs every stage that writes files — demo sessions, convert, train, plot, evaluate, merge, MLX
export, registry — each through its own CLI `main()`, on the tiny model, writing only under OUT.
Used by test_file_modes.py, which starts it under umask 022 and then checks the modes."""

import sys
from pathlib import Path


def run(stage: str, main, argv: list[str]) -> None:
    print(f"[flow] {stage}", flush=True)
    rc = main(argv)
    if rc not in (0, None):
        raise SystemExit(f"{stage} exited with {rc}")


def flow(tiny_model: str, out: Path) -> None:
    from pokemon_gemma import train
    from pokemon_gemma.cli import convert, demo, evaluate, merge, plot_training, registry

    out.mkdir()
    run("demo", demo.main, ["--output_dir", str(out / "sessions"), "--sessions", "10", "--seed", "0"])
    data = out / "data"
    run(
        "convert", convert.main, ["--eevee_data_dir", str(out / "sessions"), "--output_dir", str(data), "--copy_images"]
    )
    run_dir = out / "run"
    run(
        "train",
        train.main,
        [
            *("--model_name", tiny_model, "--dataset_path", str(data / "train.jsonl")),
            *("--eval_dataset_path", str(data / "val.jsonl"), "--output_dir", str(run_dir)),
            *("--max_steps", "2", "--batch_size", "2", "--grad_accum", "1", "--save_steps", "1"),
            *("--eval_steps", "2", "--eval_max_samples", "2", "--logging_steps", "1", "--report_to", "none"),
        ],
    )
    run("plot", plot_training.main, ["--run_dir", str(run_dir)])
    eval_dir = out / "eval"
    run(
        "evaluate",
        evaluate.main,
        [
            *("--model_name", str(run_dir), "--dataset_path", str(data / "test.jsonl")),
            *("--output_dir", str(eval_dir), "--limit", "2", "--no_progress"),
        ],
    )
    merged = out / "merged"
    run(
        "merge",
        merge.main,
        [
            *("--base_model", tiny_model, "--lora_path", str(run_dir), "--output_path", str(merged)),
            *("--dtype", "fp32", "--verify_samples", "1"),
        ],
    )
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        print("[flow] export skipped: mlx-vlm is not installed", flush=True)
    else:
        from pokemon_gemma.cli import export_mlx

        run(
            "export",
            export_mlx.main,
            [
                "--model_path",
                str(merged),
                "--output_path",
                str(out / "mlx"),
                "--quantization_bits",
                "none",
                "--no-verify",
            ],
        )
    db = out / "registry" / "registry.db"
    run(
        "registry",
        registry.main,
        [
            *("--registry_db", str(db), "register", "--name", "modes", "--checkpoint", str(merged)),
            *("--metrics", str(eval_dir / "eval_report.json")),
        ],
    )
    run(
        "registry export",
        registry.main,
        ["--registry_db", str(db), "export", "modes", "--version", "1", "--output", str(out / "v1.json")],
    )


if __name__ == "__main__":
    flow(sys.argv[1], Path(sys.argv[2]))
