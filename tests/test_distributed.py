"""Training beyond one device: every accelerate config loads with accelerate's own loader and either
works or is refused in one line; one precision resolution; FSDP2 and DeepSpeed ZeRO-3 on 2 CPU
processes (gloo) end with the DDP run's adapter and resume after SIGKILL; W&B key and run id."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pokemon_gemma import distributed as dist
from pokemon_gemma.config import Settings, add_settings_args, load_settings, settings_from_args
from tests.conftest import REPO_ROOT
from tests.helpers import kill_tree, run_tree, write_dataset

CONFIGS = sorted(p.name for p in (REPO_ROOT / "accelerate_configs").glob("*.yaml"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
ENV.pop("MIXED_PRECISION", None)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]

CPU = dist.Machine(cuda_devices=0, mps=False, deepspeed=True)
CPU_NO_DEEPSPEED = dist.Machine(cuda_devices=0, mps=False, deepspeed=False)
ONE_GPU = dist.Machine(cuda_devices=1, mps=False, deepspeed=True)
FOUR_GPUS = dist.Machine(cuda_devices=4, mps=False, deepspeed=True)
MAC = dist.Machine(cuda_devices=0, mps=True, deepspeed=False)
GPU_ONLY = "asks for"  # start of every "needs a GPU" refusal

# config -> {machine: None (works, with these launch args) or the refusal's text}; the README table says the same.
TABLE = {
    "cpu.yaml": {CPU: [], FOUR_GPUS: []},
    "fsdp_cpu.yaml": {CPU: [], FOUR_GPUS: []},
    "deepspeed_zero3_cpu.yaml": {CPU: [], CPU_NO_DEEPSPEED: "DeepSpeed, which is not installed"},
    "single_gpu.yaml": {CPU: GPU_ONLY, ONE_GPU: [], FOUR_GPUS: []},
    "multi_gpu.yaml": {CPU: GPU_ONLY, ONE_GPU: "needs at least 2 GPUs", FOUR_GPUS: ["--num_processes", "4"]},
    "fsdp.yaml": {CPU: GPU_ONLY, ONE_GPU: ["--num_processes", "1"], FOUR_GPUS: ["--num_processes", "4"]},
    "deepspeed_zero3.yaml": {CPU: GPU_ONLY, FOUR_GPUS: ["--num_processes", "4"]},
    "mps.yaml": {CPU: GPU_ONLY, MAC: []},
}


# ------------------------------------------------------------------------------------------ configs
def test_table_covers_every_config():
    assert sorted(TABLE) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_accelerates_loader_and_works_or_is_refused_in_one_line(name):
    path = REPO_ROOT / "accelerate_configs" / name
    cfg = dist.load_accelerate_config(path)  # accelerate.commands.config.load_config_from_file
    assert cfg.mixed_precision in ("no", "bf16"), "state the precision: a YAML without one is launched as 'no'"
    assert cfg.gpu_ids in (None, "all"), "gpu_ids would overwrite CUDA_VISIBLE_DEVICES"
    for machine, expected in TABLE[name].items():
        if isinstance(expected, list):
            assert dist.launch_plan(path, machine) == expected
        else:
            with pytest.raises(dist.LaunchError) as exc:
                dist.launch_plan(path, machine)
            message = str(exc.value)
            assert expected in message and "\n" not in message and message.startswith(str(path))


def test_loop_refuses_what_it_cannot_serve():
    fsdp = dist.request_from_config(dist.load_accelerate_config(REPO_ROOT / "accelerate_configs/fsdp.yaml"))
    for change, why in [
        ({"fsdp_version": 1}, "supports FSDP2 only"),
        ({"fsdp_wrap": "SIZE_BASED_WRAP"}, "use TRANSFORMER_BASED_WRAP"),
    ]:
        with pytest.raises(dist.LaunchError, match=why):
            dist.check_launch(dist.LaunchRequest(**{**fsdp.__dict__, **change}), FOUR_GPUS)
    with pytest.raises(dist.LaunchError, match="full fine-tuning"):
        dist.check_launch(fsdp, FOUR_GPUS, peft=False)
    ds = dist.request_from_config(dist.load_accelerate_config(REPO_ROOT / "accelerate_configs/deepspeed_zero3.yaml"))
    with pytest.raises(dist.LaunchError, match="QLoRA under DeepSpeed"):
        dist.check_launch(ds, FOUR_GPUS, qlora=True)
    with pytest.raises(dist.LaunchError, match="8 processes on this machine but 4 CUDA GPU"):
        dist.check_launch(dist.LaunchRequest(**{**ds.__dict__, "local_world_size": 8}), FOUR_GPUS)


def test_accelerate_rejects_unknown_keys_and_so_does_the_preflight(tmp_path):
    bad = tmp_path / "old_mps.yaml"
    bad.write_text((REPO_ROOT / "accelerate_configs/mps.yaml").read_text() + "use_mps_device: true\n")
    with pytest.raises(dist.LaunchError, match=r"accelerate cannot load it .*unknown keys \(\['use_mps_device'\]\)"):
        dist.launch_plan(bad, MAC)


@pytest.mark.slow  # two launches (~10 s each)
def test_gpu_config_is_refused_before_launch_and_by_the_script_itself(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", 4)
    flags = ["--model_name", str(tiny_model_dir), "--dataset_path", str(data), "--eval_dataset_path", ""]
    flags += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    env = {**ENV, "ACCELERATE_CONFIG": "accelerate_configs/multi_gpu.yaml", "PYTHON": sys.executable}
    pre = subprocess.run(
        ["./train_gemma3.sh", *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in pre.stderr.splitlines() if line.startswith("error:")]
    assert pre.returncode == 1 and "Traceback" not in pre.stderr, pre.stderr[-2000:]
    assert errors == [
        "error: accelerate_configs/multi_gpu.yaml asks for CUDA GPUs (use_cpu: false) and none is visible; "
        "on CPU use accelerate_configs/cpu.yaml"
    ]
    # Launched directly (no train_gemma3.sh): the training script refuses at start, once, and nothing hangs.
    start = time.monotonic()
    cmd = [*LAUNCH, "--config_file", "accelerate_configs/multi_gpu.yaml", "scripts/sft_pokemon_gemma3.py", *flags]
    raw = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in raw.stderr.splitlines() if line.startswith("error:")]
    assert raw.returncode != 0 and len(errors) == 1 and "asks for CUDA GPUs" in errors[0], raw.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    print(f"direct launch refused in {time.monotonic() - start:.1f} s")


@pytest.mark.slow  # one launch (~10 s)
def test_single_gpu_config_keeps_cuda_visible_devices(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nprint('CVD=' + os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))\n")
    cmd = [*LAUNCH, "--config_file", "accelerate_configs/single_gpu.yaml", str(probe)]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env={**ENV, "CUDA_VISIBLE_DEVICES": "3"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CVD=3" in proc.stdout  # the YAML once said gpu_ids: '0', and accelerate exported CUDA_VISIBLE_DEVICES=0


@pytest.mark.slow  # 6 Python subprocesses (~20 s)
def test_train_script_and_gpu_checks_parse():
    for script in ("train_gemma3.sh", "bench/gpu_checks.sh", "bench/gpu_checks_multi.sh", "init.sh", "test.sh"):
        proc = subprocess.run(["bash", "-n", script], cwd=REPO_ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    for script in (
        "bench/gpu_checks.py",
        "bench/gpu_checks_multi.py",
        "bench/bench_train.py",
        "bench/make_random_model.py",
        "bench/make_random_gemma3.py",
    ):
        proc = subprocess.run(
            [sys.executable, script, "--help"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, f"{script}: {proc.stderr[-1000:]}"
    for script in ("bench/gpu_checks.py", "bench/gpu_checks_multi.py"):  # every command parses, configs accepted
        proc = subprocess.run(
            [sys.executable, script, "--check"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0 and "ok: " in proc.stdout, f"{script}: {proc.stderr[-1000:]}"


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    "cli,env,dotenv,accelerate_config,device,expected",
    [
        (None, None, None, None, "cpu", ("no", "device default")),
        (None, None, None, None, "cuda:bf16", ("bf16", "device default")),
        (None, None, None, None, "cuda", ("no", "device default")),  # a card without bf16
        (None, None, None, None, "mps", ("no", "device default")),
        ("", "", "", "", "cuda:bf16", ("bf16", "device default")),  # empty says nothing
        (None, None, None, "bf16", "cuda:bf16", ("bf16", "accelerate config")),
        (None, None, None, "no", "cuda:bf16", ("no", "accelerate config")),  # the config's own value wins
        (None, None, None, "bf16", "cpu", ("bf16", "accelerate config")),
        (None, None, "no", "bf16", "cuda:bf16", ("no", ".env")),
        (None, "fp16", "no", "bf16", "cuda:bf16", ("fp16", "environment")),
        ("bf16", "fp16", "no", "no", "cpu", ("bf16", "cli")),
        (None, "fp32", None, None, "cuda:bf16", ("no", "environment")),
    ],
)
def test_precision_precedence(cli, env, dotenv, accelerate_config, device, expected):
    assert dist.resolve_precision(cli, env, dotenv, accelerate_config, device) == expected


def test_precision_bad_value_is_one_line():
    with pytest.raises(ValueError, match=r"^MIXED_PRECISION='fp8' \(from cli\) must be one of no, bf16, fp16$"):
        dist.resolve_precision("fp8", None, None, None, "cpu")


@pytest.mark.parametrize(
    "argv,environ,dotenv,expected",
    [
        ([], {}, "", ("no", "device default")),
        ([], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "", ("bf16", "accelerate config")),
        ([], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "MIXED_PRECISION=no\n", ("no", ".env")),
        ([], {"ACCELERATE_MIXED_PRECISION": "no", "MIXED_PRECISION": "fp16"}, "MIXED_PRECISION=bf16\n",
         ("fp16", "environment")),
        (["--mixed_precision", "bf16"], {"MIXED_PRECISION": "no"}, "MIXED_PRECISION=fp16\n", ("bf16", "cli")),
        ([], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "MIXED_PRECISION=\n", ("bf16", "accelerate config")),
    ],
)  # fmt: skip
def test_precision_through_the_settings_loader(tmp_path, argv, environ, dotenv, expected):
    """The same table through the real stack: .env file, environment, CLI flags, accelerate's variable."""
    import argparse

    env_file = tmp_path / ".env"
    env_file.write_text(dotenv)
    settings = load_settings(env_file, environ=environ)
    parser = argparse.ArgumentParser()
    add_settings_args(parser, settings, ["mixed_precision"])
    s = settings_from_args(settings, parser.parse_args(argv))
    assert dist.precision_for(s.mixed_precision, environ=environ, env_file=env_file, device="cpu") == expected


def test_env_example_lets_the_accelerate_config_speak():
    example = load_settings(REPO_ROOT / ".env.example", environ={})
    assert example.mixed_precision == "" == Settings().mixed_precision


@pytest.mark.slow  # one launch (~10 s)
def test_precision_from_a_real_accelerate_launch(tmp_path):
    """What `accelerate launch` exports for the YAML's mixed_precision reaches the resolver; .env beats it."""
    yaml = tmp_path / "bf16_cpu.yaml"
    yaml.write_text((REPO_ROOT / "accelerate_configs/cpu.yaml").read_text().replace("'no'", "bf16"))
    (tmp_path / ".env").write_text("MIXED_PRECISION=no\n")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from pokemon_gemma.config import load_settings\n"
        "from pokemon_gemma.distributed import precision_for\n"
        "print('no_dotenv', precision_for(load_settings(None).mixed_precision, env_file=None))\n"
        "print('dotenv', precision_for(load_settings('.env').mixed_precision))\n"
    )
    proc = subprocess.run(
        [*LAUNCH, "--config_file", str(yaml), str(probe)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no_dotenv ('bf16', 'accelerate config')" in proc.stdout
    assert "dotenv ('no', '.env')" in proc.stdout


# ------------------------------------------------------------------------------------------ 2 CPU processes
STEPS = ["--max_steps", "4", "--save_steps", "2", "--eval_steps", "4"]


def launch_cmd(config, model, train, val, out, *extra):
    return [
        *LAUNCH, "--config_file", f"accelerate_configs/{config}", "--num_processes", "2",
        "scripts/sft_pokemon_gemma3.py", "--model_name", str(model), "--dataset_path", str(train),
        "--eval_dataset_path", str(val), "--output_dir", str(out), "--batch_size", "1", "--grad_accum", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "7", "--lora_dropout", "0",
        "--lora_targets", "language+vision", *STEPS, *extra,
    ]  # fmt: skip


def run(cmd, env=ENV, timeout=1800):
    """Run a launch to the end; on a failure or a test timeout no worker is left running."""
    start = time.monotonic()
    result = run_tree(cmd, REPO_ROOT, env, timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, time.monotonic() - start


def kill_after_checkpoint(cmd, out: Path, step: int) -> None:
    """Start a 2-process launch and SIGKILL the launcher and every worker once checkpoint-{step} is complete
    (torchrun's workers outlive a kill of the launcher alone)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 1800
    try:
        while not (out / f"checkpoint-{step}" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before its checkpoint"
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "run finished before it was killed"


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and len(x) > 0
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_data")
    return write_dataset(folder, 24, seed=0), write_dataset(folder, 8, seed=1, name="val.jsonl")


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, data, tmp_path_factory):
    """The 2-process DDP reference (cpu.yaml). It also runs as a W&B sweep run would under `accelerate
    launch` (WANDB_SWEEP_ID/WANDB_RUN_ID set by the agent): both ranks must pick the same run folder and
    only rank 0 may open the W&B run."""
    root = tmp_path_factory.mktemp("ddp")
    env = {**ENV, "WANDB_SWEEP_ID": "sweep0", "WANDB_RUN_ID": "sweeprun0", "WANDB_DIR": str(root)}
    proc, seconds = run(launch_cmd("cpu.yaml", tiny_model_dir, *data, root / "out", "--report_to", "wandb"), env)
    print(f"DDP 2 processes: {seconds:.1f} s")
    return root, proc


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 2-process runs: ~1 min each on 2 idle cores, 10 min when others load them
def test_ddp_reference_run_as_a_sweep_run_under_accelerate_launch(ddp_run):
    root, _ = ddp_run
    out = root / "out" / "sweeprun0"  # the sweep's run id names the run folder, on every rank
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-4" / "rng_state_1.pth").is_file()
    runs = sorted(p.name for p in (root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].endswith("-sweeprun0"), runs
    launch = json.loads((out / "run_config.json").read_text())["launch"]
    assert (launch["distributed_type"], launch["world_size"], launch["precision"]) == ("MULTI_CPU", 2, "no")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fsdp_on_two_cpu_processes_matches_ddp_and_resumes_after_sigkill(tiny_model_dir, data, ddp_run, tmp_path):
    ddp = ddp_run[0] / "out" / "sweeprun0"
    out = tmp_path / "fsdp"
    cmd = launch_cmd("fsdp_cpu.yaml", tiny_model_dir, *data, out)
    start = time.monotonic()
    kill_after_checkpoint(cmd, out, 2)
    resumed, seconds = run([*cmd, "--resume_from_checkpoint", "latest"])
    print(f"FSDP 2 processes: killed after checkpoint-2, resumed in {seconds:.1f} s; {time.monotonic() - start:.1f} s")
    assert "resumed from" in resumed.stderr and "checkpoint-2 at step 2" in resumed.stderr
    shard = next(line for line in resumed.stderr.splitlines() if "FSDP2: this rank holds" in line)
    local, full = (int(w) for w in shard.split("holds ")[1].split(" parameters")[0].split(" of "))
    assert local < full  # really sharded
    launch = json.loads((out / "run_config.json").read_text())["launch"]
    assert (launch["distributed_type"], launch["world_size"], launch["backend"]) == ("FSDP", 2, "gloo")
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["distributed"] == "fsdp"
    assert metric_steps(out) == [1, 2, 3, 4]
    diff = max_diff(ddp, out)
    print(f"FSDP (killed + resumed) vs DDP adapter: max abs diff {diff:.3e}")
    assert diff <= 1e-6  # measured 0 (bit-identical)
    assert max_diff(ddp / "best", out / "best") <= 1e-6  # eval on every rank, best gathered and saved by rank 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ddp_rows = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/accuracy"] == ddp_rows[-1]["eval/accuracy"]
    assert rows[-1]["eval/loss"] == pytest.approx(ddp_rows[-1]["eval/loss"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (./init.sh --deepspeed; test.sh installs it)")
def test_deepspeed_zero3_on_two_cpu_processes_matches_ddp_and_resumes_after_sigkill(
    tiny_model_dir, data, ddp_run, tmp_path
):
    ddp = ddp_run[0] / "out" / "sweeprun0"
    out = tmp_path / "zero3"
    cmd = launch_cmd("deepspeed_zero3_cpu.yaml", tiny_model_dir, *data, out)
    start = time.monotonic()
    kill_after_checkpoint(cmd, out, 2)
    resumed, seconds = run([*cmd, "--resume_from_checkpoint", "latest"])
    print(
        f"ZeRO-3 2 processes: killed after checkpoint-2, resumed in {seconds:.1f} s; {time.monotonic() - start:.1f} s"
    )
    assert "checkpoint-2 at step 2" in resumed.stderr
    assert "DeepSpeed engine steps 4, loop steps 4" in resumed.stderr  # one engine step per grad_accum micro-batches
    assert "DeepSpeed ZeRO-3: this rank holds" in resumed.stderr
    launch = json.loads((out / "run_config.json").read_text())["launch"]
    assert (launch["distributed_type"], launch["world_size"]) == ("DEEPSPEED", 2)
    assert (out / "checkpoint-4" / "deepspeed" / "ds").is_dir()
    assert not list(out.glob(".checkpoint-*"))  # no staging folder left behind
    assert metric_steps(out) == [1, 2, 3, 4]
    diff = max_diff(ddp, out)
    print(f"ZeRO-3 (killed + resumed) vs DDP adapter: max abs diff {diff:.3e}")
    assert diff <= 1e-4  # ZeRO-3 reduces in another order: 3.1e-6 measured, 5.2e-5 after 8 steps (max |w| 0.13)


# ------------------------------------------------------------------------------------------ W&B
FAKE_KEY = "0123456789abcdef0123456789abcdef0badbeef"


def _files_containing(root: Path, text: str) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and text.encode() in path.read_bytes():
            hits.append(path)
    return hits


def test_wandb_key_from_dotenv_reaches_the_offline_run_and_no_log_line(tmp_path, monkeypatch, capfd):
    from pokemon_gemma.config import setup_logging
    from pokemon_gemma.train import MetricsLog

    env_file = tmp_path / ".env"
    env_file.write_text(f"WANDB_API_KEY={FAKE_KEY}\nWANDB_MODE=offline\nREPORT_TO=wandb\n")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in {
        "WANDB_DIR": tmp_path,
        "WANDB_CONFIG_DIR": tmp_path / "cfg",
        "NETRC": tmp_path / "netrc",
    }.items():
        monkeypatch.setenv(name, str(value))
    s = load_settings(env_file, environ={k: v for k, v in os.environ.items() if k != "WANDB_MODE"})
    assert s.wandb_api_key == FAKE_KEY and s.wandb_mode == "offline"
    setup_logging(s)
    (tmp_path / "run").mkdir()
    metrics = MetricsLog(s, tmp_path / "run", 0, enabled=True)
    try:
        assert metrics.wandb is not None and metrics.wandb.settings.api_key == FAKE_KEY
        assert "WANDB_API_KEY" not in os.environ  # handed to the run, not to every child process
        metrics.log({"step": 1, "train/loss": 1.0})
        run_id = metrics.run_id
    finally:
        metrics.close()
    again = MetricsLog(s, tmp_path / "run", 1, enabled=True, run_id=run_id)
    try:
        assert again.run_id == run_id and again.wandb.settings.api_key == FAKE_KEY
    finally:
        again.close()
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err
    assert not (tmp_path / "netrc").exists()  # wandb.login would have appended the key there
    assert _files_containing(tmp_path, FAKE_KEY) == [env_file]


@pytest.mark.slow  # two training runs (~30 s each)
def test_resume_continues_the_same_wandb_run_and_the_key_is_never_printed(tiny_model_dir, data, tmp_path):
    """The training script as users run it: the key only in ./.env, WANDB_MODE=offline."""
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={FAKE_KEY}\nREPORT_TO=wandb\n")
    env = {k: v for k, v in ENV.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), NETRC=str(tmp_path / "netrc"))
    train, val = data
    cmd = [
        sys.executable, str(REPO_ROOT / "scripts/sft_pokemon_gemma3.py"), "--model_name", str(tiny_model_dir),
        "--dataset_path", str(train), "--eval_dataset_path", "", "--output_dir", str(tmp_path / "run"),
        "--batch_size", "2", "--grad_accum", "1", "--save_steps", "1", "--logging_steps", "1",
    ]  # fmt: skip
    outputs = []
    for extra in (["--max_steps", "1"], ["--max_steps", "2", "--resume_from_checkpoint", "latest"]):
        proc = subprocess.run([*cmd, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    assert "resumed from" in outputs[1]
    ids = [
        json.loads((tmp_path / "run" / f"checkpoint-{n}" / "trainer_state.json").read_text())["wandb_run_id"]
        for n in (1, 2)
    ]
    assert ids[0] == ids[1]
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{ids[0]}") for r in runs), runs  # `wandb sync` joins them
    assert not any(FAKE_KEY in text for text in outputs)
    assert _files_containing(tmp_path, FAKE_KEY) == [tmp_path / ".env"]
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["wandb_api_key"] == "***"


def test_differences_from_the_config_are_said_once_each():
    def record(kind, world, precision, asked):
        return dist.LaunchRecord(kind, world, precision, "cli", "cpu", None, "x.yaml", asked)

    same = {"distributed_type": "NO", "world_size": 1, "precision": "no"}
    assert dist.differences(record("MULTI_CPU", 1, "no", same)) == []  # cpu.yaml with one process
    assert dist.differences(record("NO", 1, "no", {})) == []  # not launched by accelerate
    asked = {"distributed_type": "FSDP", "world_size": 2, "precision": "bf16"}
    assert dist.differences(record("MULTI_CPU", 1, "no", asked)) == [
        "asked for FSDP, running MULTI_CPU",
        "asked for 2 processes, running 1",
        "the accelerate config's precision is 'bf16', running 'no' (from cli: CLI > environment > .env > "
        "accelerate config)",
    ]
