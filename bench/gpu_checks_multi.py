#!/usr/bin/env python
"""Multi-GPU checks for training beyond one device (2+ CUDA GPUs, a few minutes, nothing downloaded).
The same proof as tests/test_distributed.py on CPU, on NCCL: the tiny Gemma 3, 2..N GPU processes.

  1. DDP reference: accelerate_configs/multi_gpu.yaml.
  2. FSDP2: accelerate_configs/fsdp.yaml, SIGKILLed (launcher and every worker) once checkpoint-2 is
     complete, then resumed with --resume_from_checkpoint latest.
  3. DeepSpeed ZeRO-3: accelerate_configs/deepspeed_zero3.yaml, killed and resumed the same way
     (skipped when deepspeed is not installed).
  4. fsdp.yaml with its own precision (no --mixed_precision): the run must record bf16 "from accelerate
     config" and end near the fp32 DDP adapter.
Runs 1-3 use --mixed_precision no so that the adapters are comparable. Checked: each run got the
distributed type and world size it asked for; resumed runs log steps 1..N once; the final adapter
against DDP's (max abs diff; the CPU tests measure 0 for FSDP2 and 5e-5 for ZeRO-3; NCCL reduces in
another order, so the tolerances here are 1e-4 fp32 and 2e-2 bf16); DeepSpeed engine steps = loop steps.

    bench/gpu_checks_multi.sh                 # or: OUT=/tmp/x NPROC=4 bench/gpu_checks_multi.sh
    python bench/gpu_checks_multi.py --check  # CPU: build and parse every command, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def train_cmd(config: str, nproc: int, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}",
        "--num_processes", str(nproc), "scripts/sft_pokemon_gemma3.py", "--model_name", str(model),
        "--dataset_path", str(data / "train.jsonl"), "--eval_dataset_path", str(data / "val.jsonl"),
        "--output_dir", str(out), "--batch_size", "1", "--grad_accum", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--seed", "7", "--lora_dropout", "0", "--lora_targets", "language+vision",
        "--max_steps", str(STEPS), "--save_steps", "2", "--eval_steps", "3", "--report_to", "none", *extra,
    ]  # fmt: skip


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers outlive their launcher)."""
    import psutil

    try:
        victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=60)


def launch(cmd: list[str], log: Path, kill_at: Path | None = None, timeout: float = 900) -> float:
    """Run a launch to the end (or SIGKILL it once `kill_at` exists); raise with the log's tail on failure."""
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and time.monotonic() - start < timeout:
                if kill_at is not None and kill_at.exists():
                    kill_tree(proc.pid)
                    proc.wait()
                    return time.monotonic() - start
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
    if kill_at is not None:
        raise RuntimeError(f"{log}: ended before {kill_at.parent.name} (exit {proc.returncode})")
    if proc.returncode != 0:
        raise RuntimeError(f"{log}: exit {proc.returncode}\n" + "".join(log.read_text().splitlines(True)[-30:]))
    return time.monotonic() - start


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and x, f"{a} and {b} hold different adapters"
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def summary(out: Path, log: Path) -> dict:
    launch_info = json.loads((out / "run_config.json").read_text())["launch"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    text = log.read_text()
    engine = [line for line in text.splitlines() if "DeepSpeed engine steps" in line]
    shard = [line for line in text.splitlines() if "this rank holds" in line]
    return {
        "distributed_type": launch_info["distributed_type"],
        "world_size": launch_info["world_size"],
        "precision": f"{launch_info['precision']} (from {launch_info['precision_source']})",
        "metric_steps_ok": steps == list(range(1, STEPS + 1)),
        "shard": shard[-1].split("INFO")[-1].strip(" -:") if shard else None,
        "engine_steps": engine[-1].split("DeepSpeed ")[-1] if engine else None,
    }


def plan(nproc: int, model: Path, data: Path, work: Path, deepspeed: bool) -> list[dict]:
    fp32 = ["--mixed_precision", "no"]
    runs = [{"tag": "ddp", "config": "multi_gpu.yaml", "extra": fp32, "expect": "MULTI_GPU", "kill": False}]
    runs.append({"tag": "fsdp2", "config": "fsdp.yaml", "extra": fp32, "expect": "FSDP", "kill": True})
    if deepspeed:
        runs.append({"tag": "zero3", "config": "deepspeed_zero3.yaml", "extra": fp32, "expect": "DEEPSPEED",
                     "kill": True})  # fmt: skip
    runs.append({"tag": "fsdp2_bf16", "config": "fsdp.yaml", "extra": [], "expect": "FSDP", "kill": False})
    for run in runs:
        run["out"] = work / run["tag"]
        run["cmd"] = train_cmd(run["config"], nproc, model, data, run["out"], *run["extra"])
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="/tmp/gpu_checks_multi/tiny", help="scripts/make_tiny_model.py output")
    parser.add_argument("--data_dir", default="/tmp/gpu_checks_multi/data", help="train.jsonl and val.jsonl")
    parser.add_argument("--output_dir", default="/tmp/gpu_checks_multi_out", help="results, logs and run folders")
    parser.add_argument("--nproc", type=int, default=0, help="GPU processes (default: every visible GPU)")
    parser.add_argument("--check", action="store_true", help="parse every command and config; run nothing")
    args = parser.parse_args(argv)
    import importlib.util

    from pokemon_gemma import distributed as dist

    has_ds = importlib.util.find_spec("deepspeed") is not None
    out_dir = Path(args.output_dir)
    if args.check:
        from pokemon_gemma.config import Settings
        from pokemon_gemma.train import build_arg_parser

        train_parser = build_arg_parser(Settings())
        gpus = dist.Machine(cuda_devices=2, mps=False, deepspeed=True)
        for run in plan(2, Path(args.model_dir), Path(args.data_dir), out_dir / "runs", True):
            train_parser.parse_args(run["cmd"][run["cmd"].index("scripts/sft_pokemon_gemma3.py") + 1 :])
            dist.launch_plan(REPO / "accelerate_configs" / run["config"], gpus)
            print(f"ok: {run['tag']} ({run['config']})")
        return 0
    import torch

    nproc = args.nproc or torch.cuda.device_count()
    if nproc < 2:
        print(f"error: needs 2+ visible CUDA GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    work = out_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    results, failed = {}, False
    for run in plan(nproc, Path(args.model_dir), Path(args.data_dir), work, has_ds):
        tag, out, log = run["tag"], run["out"], out_dir / f"{run['tag']}.log"
        print(f"=== {tag}: {run['config']} x {nproc} GPUs", flush=True)
        try:
            seconds = 0.0
            if run["kill"]:
                seconds += launch(
                    run["cmd"], out_dir / f"{tag}_killed.log", kill_at=out / "checkpoint-2" / "trainer_state.json"
                )
                assert not (out / "adapter_model.safetensors").exists(), "finished before the kill"
                seconds += launch([*run["cmd"], "--resume_from_checkpoint", "latest"], log)
                assert "checkpoint-2 at step 2" in log.read_text(), "did not resume from checkpoint-2"
            else:
                seconds += launch(run["cmd"], log)
            res = {"config": run["config"], "wall_s": round(seconds, 1), **summary(out, log)}
            res["got_what_it_asked"] = (res["distributed_type"], res["world_size"]) == (run["expect"], nproc)
            if tag != "ddp" and "ddp" in results and "error" not in results["ddp"]:
                diff = max_diff(work / "ddp", out)
                tol = TOLERANCE["bf16" if tag.endswith("bf16") else "fp32"]
                res["max_abs_diff_vs_ddp"], res["within_tolerance"] = diff, diff <= tol
            ok = res["got_what_it_asked"] and res["metric_steps_ok"] and res.get("within_tolerance", True)
            if tag == "fsdp2_bf16":
                ok = ok and res["precision"] == "bf16 (from accelerate config)"
            if tag == "zero3":
                ok = ok and res["engine_steps"] == f"engine steps {STEPS}, loop steps {STEPS}"
            res["ok"] = ok
        except (RuntimeError, AssertionError, OSError) as exc:
            res = {"config": run["config"], "error": str(exc).splitlines()[0], "ok": False}
        failed |= not res["ok"]
        results[tag] = res
        print(json.dumps(res), flush=True)
    if not has_ds:
        results["zero3"] = {"skipped": "deepspeed not installed (pip install -r requirements-deepspeed.txt)"}
    (out_dir / "gpu_checks_multi.json").write_text(json.dumps(results, indent=2))
    for tag, res in results.items():
        print(f"{tag:12} {'OK' if res.get('ok') else 'SKIP' if 'skipped' in res else 'FAIL'} {json.dumps(res)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
