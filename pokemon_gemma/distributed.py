"""Training beyond one device: precision, the accelerate launch, and the few places where the loop
differs under FSDP2 or DeepSpeed ZeRO-3.

- `resolve_precision`: CLI > environment > `.env` > the accelerate config > the device's best default
  (bf16 on a CUDA card that supports it, fp32 elsewhere); training, the batch finder and validation
  all call `precision_for(settings)`.
- `launch_request` / `check_launch`: what the accelerate launch asked for (its config file, read with
  accelerate's own loader, and the environment the launcher exported) against what this machine
  has; a launch the loop cannot serve is refused with one line, never left to hang or to fall back
  silently (accelerate 1.15 runs an FSDP or DeepSpeed config on CPU as plain DDP).
- `make_accelerator`: the Accelerator for that launch. FSDP2 and ZeRO-3 also run on CPU processes
  over gloo, which is how the tests prove the loop shard-aware without a GPU.
- `Strategy`: what the loop calls where DDP, FSDP2 and ZeRO-3 differ (prepare, backward, clipping,
  gathering the adapter and the optimizer state for a checkpoint, restoring them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("no", "bf16", "fp16")
WRAP_CLASSES = "Gemma3DecoderLayer,SiglipEncoderLayer"
CPU_CONFIG_FOR = {  # the CPU counterpart of each kind of GPU config
    "FSDP": "accelerate_configs/fsdp_cpu.yaml",
    "DEEPSPEED": "accelerate_configs/deepspeed_zero3_cpu.yaml",
}


class LaunchError(RuntimeError):
    """This launch cannot be served by the loop; the message is one line saying why and what to use."""


# --------------------------------------------------------------------------------------- precision
def detect_device() -> str:
    """'cuda:bf16', 'cuda' (a card without bf16, e.g. pre-Ampere), 'mps' or 'cpu'."""
    if torch.cuda.is_available():
        return "cuda:bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def device_default_precision(device: str | None = None) -> str:
    """bf16 on a CUDA card that supports it, else fp32 ('no'): bf16 on CPU is slow and lossy, and fp16
    needs a loss scaler, so neither is ever chosen for you."""
    return "bf16" if (device or detect_device()) == "cuda:bf16" else "no"


def resolve_precision(
    cli: str | None, env: str | None, dotenv: str | None, accelerate_config: str | None, device: str | None = None
) -> tuple[str, str]:
    """(precision, where it came from): the first source that says something, in the order
    CLI > environment > .env > accelerate config > device default. None or '' says nothing;
    'fp32' means 'no'."""
    for source, value in (
        ("cli", cli),
        ("environment", env),
        (".env", dotenv),
        ("accelerate config", accelerate_config),
    ):
        if value:
            value = value.strip().lower()
            value = "no" if value == "fp32" else value
            if value not in PRECISIONS:
                raise ValueError(f"MIXED_PRECISION={value!r} (from {source}) must be one of {', '.join(PRECISIONS)}")
            return value, source
    return device_default_precision(device), "device default"


def precision_for(
    mixed_precision: str,
    *,
    environ: dict | None = None,
    env_file: str | Path | None = ".env",
    device: str | None = None,
) -> tuple[str, str]:
    """Resolve a Settings.mixed_precision value, which the settings loader already took from
    CLI > environment > .env ('' = none of them set it), naming its source; then the accelerate
    config (the ACCELERATE_MIXED_PRECISION that `accelerate launch` exports: the YAML's value, or
    'no' when the YAML has none) and the device default."""
    from dotenv import dotenv_values

    environ = os.environ if environ is None else environ
    env = environ.get("MIXED_PRECISION")
    dotenv = dotenv_values(env_file).get("MIXED_PRECISION") if env_file and Path(env_file).is_file() else None
    value = mixed_precision or None
    sources = {"cli": None, "environment": None, ".env": None}
    if value:
        if env is not None:
            sources["environment" if env == value else "cli"] = value
        else:
            sources[".env" if dotenv == value else "cli"] = value
    return resolve_precision(
        sources["cli"], sources["environment"], sources[".env"], environ.get("ACCELERATE_MIXED_PRECISION"), device
    )


# --------------------------------------------------------------------------------------- the launch
@dataclass
class LaunchRequest:
    """What the accelerate launch asked for: its config file (when found) and the exported environment."""

    launched: bool  # started by `accelerate launch`
    config_file: str | None
    distributed_type: str  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
    use_cpu: bool | None  # None: the launch does not say
    world_size: int
    local_world_size: int
    precision: str | None  # ACCELERATE_MIXED_PRECISION
    fsdp_version: int | None = None
    fsdp_wrap: str | None = None

    @property
    def name(self) -> str:
        return self.config_file or "this accelerate launch"


def _launcher_config_file(environ: dict) -> str | None:
    """The --config_file of the `accelerate launch` process that started this one (Linux /proc), or
    accelerate's default config when it was launched without one. accelerate exports neither the path
    nor `use_cpu` for multi-process launches, so the file is the only place that says CPU or GPU."""
    ppid = os.getppid()
    try:
        argv = [a.decode() for a in Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{ppid}/cwd")
    except OSError:
        return None
    if not any("accelerate" in a for a in argv[:3]):
        return None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            return os.path.normpath(os.path.join(cwd, argv[i + 1]))
        if arg.startswith("--config_file="):
            return os.path.normpath(os.path.join(cwd, arg.split("=", 1)[1]))
    from accelerate.commands.config import default_config_file

    return default_config_file if os.path.isfile(default_config_file) else None


def load_accelerate_config(path: str | Path):
    """An accelerate config through accelerate's own loader (what `accelerate launch` reads)."""
    from accelerate.commands.config import load_config_from_file

    return load_config_from_file(str(path))


def launch_request(environ: dict | None = None, config_file: str | None = None) -> LaunchRequest:
    environ = os.environ if environ is None else environ
    launched = "ACCELERATE_MIXED_PRECISION" in environ
    if launched and config_file is None:
        config_file = _launcher_config_file(environ)
    use_cpu = None
    if "ACCELERATE_USE_CPU" in environ:  # exported by the single-process launcher only
        use_cpu = environ["ACCELERATE_USE_CPU"].lower() == "true"
    elif config_file:
        try:
            use_cpu = bool(load_accelerate_config(config_file).use_cpu)
        except Exception:  # noqa: BLE001 - an unreadable file: the launcher already read it; only the env counts
            use_cpu = None
    world = int(environ.get("WORLD_SIZE", "1"))
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        kind = "DEEPSPEED"
    elif environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        kind = "FSDP"
    elif world > 1:
        kind = "MULTI_CPU" if use_cpu or (use_cpu is None and not torch.cuda.is_available()) else "MULTI_GPU"
    else:
        kind = "NO"
    return LaunchRequest(
        launched=launched,
        config_file=config_file,
        distributed_type=kind,
        use_cpu=use_cpu,
        world_size=world,
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
        precision=environ.get("ACCELERATE_MIXED_PRECISION"),
        fsdp_version=int(environ["FSDP_VERSION"]) if kind == "FSDP" and "FSDP_VERSION" in environ else None,
        fsdp_wrap=environ.get("FSDP_AUTO_WRAP_POLICY") if kind == "FSDP" else None,
    )


@dataclass(frozen=True)
class Machine:
    cuda_devices: int
    mps: bool
    deepspeed: bool  # the deepspeed package imports

    @classmethod
    def this(cls) -> Machine:
        import importlib.util

        return cls(
            cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            mps=torch.backends.mps.is_available(),
            deepspeed=importlib.util.find_spec("deepspeed") is not None,
        )


def check_launch(req: LaunchRequest, machine: Machine, *, qlora: bool = False, peft: bool = True) -> None:
    """Refuse, in one line, a launch the loop cannot serve on this machine (raises LaunchError)."""
    name, kind = req.name, req.distributed_type
    if kind == "DEEPSPEED" and not machine.deepspeed:
        raise LaunchError(
            f"{name} uses DeepSpeed, which is not installed (./init.sh --deepspeed, or "
            "pip install -r requirements-deepspeed.txt)"
        )
    if kind == "FSDP" and req.fsdp_version not in (None, 2):
        raise LaunchError(
            f"{name}: fsdp_version {req.fsdp_version} is refused: the loop supports FSDP2 only (under FSDP1 a LoRA "
            "gradient clip is rank-local and CPU processes fail to wrap); set fsdp_version: 2"
        )
    if kind == "FSDP" and req.fsdp_wrap not in (None, "TRANSFORMER_BASED_WRAP"):
        raise LaunchError(
            f"{name}: fsdp_auto_wrap_policy {req.fsdp_wrap} is refused (FSDP2 cannot wrap PEFT's LoRA ModuleDicts); "
            f"use TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap: {WRAP_CLASSES}"
        )
    if kind in ("FSDP", "DEEPSPEED") and not (peft or qlora):
        raise LaunchError(
            f"{name}: full fine-tuning (--no_peft) under {kind} is refused: only LoRA/QLoRA adapters are "
            "gathered and restored shard-aware; use LoRA, or DDP (multi_gpu.yaml) for full fine-tuning"
        )
    if kind == "DEEPSPEED" and qlora:
        raise LaunchError(
            f"{name}: QLoRA under DeepSpeed is refused (4-bit weights are not partitioned by ZeRO-3 and this "
            "combination is untested); use accelerate_configs/fsdp.yaml for QLoRA on several GPUs"
        )
    if req.use_cpu is False and machine.cuda_devices == 0 and not (machine.mps and req.world_size == 1):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        alternative = CPU_CONFIG_FOR.get(kind, "accelerate_configs/cpu.yaml")
        gpus = "CUDA GPUs" if req.world_size > 1 else "a GPU (CUDA or Apple MPS)"
        raise LaunchError(
            f"{name} asks for {gpus} (use_cpu: false) and none is visible{where}; on CPU use {alternative}"
        )
    if machine.cuda_devices and req.use_cpu is not True and req.local_world_size > machine.cuda_devices:
        raise LaunchError(
            f"{name}: {req.local_world_size} processes on this machine but {machine.cuda_devices} CUDA GPU(s) "
            f"visible; pass --num_processes {machine.cuda_devices} (train_gemma3.sh counts them)"
        )


# --------------------------------------------------------------------------------------- accelerator
def use_own_extensions_dir() -> str:
    """DeepSpeed JIT-compiles a C++ op on CPU into torch's extension cache. Kept per environment (inside the
    venv; init.sh --deepspeed pre-builds it there): a shared ~/.cache/torch_extensions is rebuilt whenever
    another environment with other include paths used it, and a build killed midway leaves a lock file that
    makes every later start wait forever."""
    import sys

    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def make_accelerator(req: LaunchRequest, precision: str):
    """The Accelerator for this launch. GPUs take accelerate's own path. On CPU processes:
    - FSDP: accelerate 1.15 switches to FSDP only for GPU-like types and would silently run DDP
      (MULTI_CPU); torch's FSDP2 shards fine over gloo, so the state is switched to FSDP by hand, in
      both shared state objects (every later AcceleratorState() copies PartialState's fields back).
    - DeepSpeed: cpu=True would silently drop DeepSpeed; cpu=False without a backend leaves accelerate
      at one process while DeepSpeed sees two; a gloo backend gives both the real world.
    Raises LaunchError when the result is not what was asked for."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if req.distributed_type == "DEEPSPEED":
        use_own_extensions_dir()
    if cpu and req.distributed_type == "DEEPSPEED" and req.world_size > 1:
        accelerator = Accelerator(
            mixed_precision=precision, cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]
        )
    elif cpu and req.distributed_type == "FSDP" and req.world_size > 1:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher exported
        accelerator = Accelerator(mixed_precision=precision, cpu=True, fsdp_plugin=plugin)
        if accelerator.distributed_type == DistributedType.MULTI_CPU:
            from accelerate.state import PartialState

            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
            if precision != "no":
                plugin.set_mixed_precision(precision)
    else:
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
    got = accelerator.distributed_type.value
    if req.distributed_type in ("FSDP", "DEEPSPEED") and got != req.distributed_type:
        raise LaunchError(f"{req.name} asks for {req.distributed_type} but accelerate set up {got}")
    if req.launched and accelerator.num_processes != req.world_size:
        raise LaunchError(
            f"{req.name} starts {req.world_size} processes but accelerate joined {accelerator.num_processes}"
        )
    return accelerator


@dataclass
class LaunchRecord:
    """What the run actually got, saved in run_config.json beside what the launch asked for."""

    distributed_type: str
    world_size: int
    precision: str
    precision_source: str
    device: str
    backend: str | None
    accelerate_config: str | None
    asked: dict

    def to_json(self) -> dict:
        return asdict(self)


def launch_record(req: LaunchRequest, accelerator, precision: str, source: str) -> LaunchRecord:
    asked = {"distributed_type": req.distributed_type, "world_size": req.world_size, "precision": req.precision}
    if req.use_cpu is not None:
        asked["use_cpu"] = req.use_cpu
    return LaunchRecord(
        distributed_type=accelerator.distributed_type.value,
        world_size=accelerator.num_processes,
        precision=precision,
        precision_source=source,
        device=str(accelerator.device),
        backend=accelerator.state.backend,
        accelerate_config=req.config_file,
        asked=asked if req.launched else {},
    )


def differences(rec: LaunchRecord) -> list[str]:
    """One line per way this run differs from what the accelerate config asked for."""
    asked, out = rec.asked, []
    if not asked:
        return out

    def kind(distributed_type: str, world: int) -> str:  # one process: accelerate says NO or MULTI_CPU alike
        return (
            "one process" if world == 1 and distributed_type in ("NO", "MULTI_CPU", "MULTI_GPU") else distributed_type
        )

    if kind(asked["distributed_type"], asked["world_size"]) != kind(rec.distributed_type, rec.world_size):
        out.append(f"asked for {asked['distributed_type']}, running {rec.distributed_type}")
    if asked["world_size"] != rec.world_size:
        out.append(f"asked for {asked['world_size']} processes, running {rec.world_size}")
    if asked["precision"] and asked["precision"] != rec.precision:
        out.append(
            f"the accelerate config's precision is {asked['precision']!r}, running {rec.precision!r} "
            f"(from {rec.precision_source}: CLI > environment > .env > accelerate config)"
        )
    return out


def setup(mixed_precision: str, *, qlora: bool = False, peft: bool = True):
    """Everything the loop needs before the model: check this launch against this machine (LaunchError),
    resolve the precision, build the Accelerator and the Strategy; rank 0 says what it got and how that
    differs from what the accelerate config asked for. Returns (accelerator, strategy, LaunchRecord)."""
    request = launch_request()
    check_launch(request, Machine.this(), qlora=qlora, peft=peft)
    try:
        precision, source = precision_for(mixed_precision)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    accelerator = make_accelerator(request, precision)
    record = launch_record(request, accelerator, precision, source)
    if accelerator.is_main_process:
        config = f", accelerate config {record.accelerate_config}" if record.accelerate_config else ""
        log.info(
            "%s, %d process(es) (%s), device %s, precision %s (from %s)%s",
            record.distributed_type, record.world_size, record.backend, record.device, precision, source, config,
        )  # fmt: skip
        for difference in differences(record):
            log.warning("%s: %s", request.name, difference)
    return accelerator, Strategy(accelerator), record


# --------------------------------------------------------------------------------------- strategy
class Strategy:
    """Where the loop differs between one process/DDP ('ddp'), FSDP2 ('fsdp') and ZeRO-3 ('deepspeed').

    Under 'fsdp' and 'deepspeed' the model is sharded: every rank runs eval on the same records and
    every rank joins the gathers of the adapter and optimizer state; rank 0 writes the files."""

    def __init__(self, accelerator):
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.kind = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(
            accelerator.distributed_type, "ddp"
        )

    @property
    def sharded(self) -> bool:
        return self.kind != "ddp"

    def prepare(self, model, optimizer, *, batch_size: int, grad_accum: int, max_grad_norm: float):
        """accelerate.prepare, then the trainable parameters as prepared (FSDP2 swaps in DTensors: a
        list taken before prepare would clip nothing)."""
        if self.kind == "deepspeed":
            # The loop's own micro-batch, accumulation and clipping, so prepare() needs no dataloader and
            # the engine steps (and clips) once per grad_accum micro-batches, not once per micro-batch.
            cfg = self.accelerator.state.deepspeed_plugin.deepspeed_config
            cfg["train_micro_batch_size_per_gpu"] = batch_size
            cfg["gradient_accumulation_steps"] = grad_accum
            cfg["train_batch_size"] = batch_size * grad_accum * self.accelerator.num_processes
            cfg["gradient_clipping"] = max_grad_norm if max_grad_norm > 0 else 0.0
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer, [p for p in model.parameters() if p.requires_grad]

    def micro_batch(self, model, last: bool):
        """Context for one micro-batch's forward/backward: no gradient sync before the last one."""
        if self.kind == "deepspeed":
            # accelerator.backward() steps the engine whenever sync_gradients is True (outside accumulate()
            # it always is): only the step's last micro-batch may.
            self.accelerator.gradient_state._set_sync_gradients(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, loss) -> None:
        if self.kind == "deepspeed":  # the loss is already normalised over the step: no division by GAS
            self.accelerator.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip(self, trainable, max_norm: float) -> None:
        """DDP and FSDP2 (DTensor-aware global norm) clip here; the DeepSpeed engine clips in its step."""
        if max_norm > 0 and self.kind != "deepspeed":
            self.accelerator.clip_grad_norm_(trainable, max_norm)

    def eval_model(self, model):
        return self.accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def evaluating(self, model):
        """FSDP2: gather the root unit's own parameters (embeddings, projector, norms outside a wrapped
        layer) for the whole eval: the scorer calls submodules outside the root forward."""
        if self.kind == "fsdp":
            model.unshard()
            try:
                yield
            finally:
                model.reshard()
        else:
            yield

    def trainable_state(self, model) -> dict[str, torch.Tensor] | None:
        """The trainable weights gathered in full on rank 0 (FQN keys, CPU); None for DDP, whose module
        saves itself. Collective under FSDP/DeepSpeed: every rank must call it."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            return get_model_state_dict(model, options=options)
        if self.kind == "deepspeed":
            import deepspeed

            named = [(n, p) for n, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                if not self.accelerator.is_main_process:
                    return {}
                return {n: p.detach().cpu().clone() for n, p in named}
        return None

    def optimizer_state(self, model, optimizer) -> dict | None:
        """Full optimizer state for optimizer.pt (collective under FSDP); None under DeepSpeed, whose
        engine writes its own partitioned files."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(model, optimizer, options=options)
        if self.kind == "deepspeed":
            return None
        return optimizer.state_dict()

    def save_engine(self, model, folder: Path) -> None:
        """DeepSpeed: every rank writes its partition of the trainable weights and optimizer state."""
        if self.kind == "deepspeed":
            model.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=True)

    def restore(self, model, optimizer, weights: dict[str, torch.Tensor], optimizer_state, engine_dir: Path | None):
        """Load a checkpoint's weights and optimizer state (already read and verified) into this run."""
        if self.kind == "deepspeed":
            model.load_checkpoint(
                str(engine_dir), tag="ds", load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )  # fmt: skip
            return
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
            return
        raise AssertionError("DDP checkpoints are restored by checkpoint.restore")

    def describe(self, model) -> str:
        """Evidence of sharding for the start-up log: this rank's share of the parameters."""
        if self.kind == "fsdp":
            from torch.distributed.tensor import DTensor

            full = sum(p.numel() for p in model.parameters())
            local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
            return f"FSDP2: this rank holds {local} of {full} parameters"
        if self.kind == "deepspeed":
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
            return f"DeepSpeed ZeRO-{stage}: this rank holds {local} of {full} parameters"
        return f"{self.accelerator.distributed_type.value}: every rank holds the whole model"


# --------------------------------------------------------------------------------------- pre-flight
def request_from_config(cfg, num_processes: int | None = None) -> LaunchRequest:
    """What an accelerate config (a ClusterConfig from its own loader) will ask for when launched."""
    raw = cfg.distributed_type.value if hasattr(cfg.distributed_type, "value") else str(cfg.distributed_type)
    world = num_processes or cfg.num_processes or 1
    if raw in ("FSDP", "DEEPSPEED"):
        kind = raw
    elif world > 1 or raw.startswith("MULTI_"):
        kind = "MULTI_CPU" if cfg.use_cpu else "MULTI_GPU"
    else:
        kind = "NO"
    fsdp = cfg.fsdp_config or {}
    return LaunchRequest(
        launched=True,
        config_file=None,
        distributed_type=kind,
        use_cpu=bool(cfg.use_cpu),
        world_size=world,
        local_world_size=max(1, world // max(1, cfg.num_machines or 1)),
        precision=cfg.mixed_precision or "no",
        fsdp_version=int(fsdp.get("fsdp_version", 1)) if kind == "FSDP" else None,
        fsdp_wrap=fsdp.get("fsdp_auto_wrap_policy") if kind == "FSDP" else None,
    )


def launch_plan(config_file: str | Path, machine: Machine | None = None, *, num_machines: int = 1) -> list[str]:
    """The `accelerate launch` arguments train_gemma3.sh adds for this config on this machine: one
    process per visible GPU for multi-process GPU configs (CUDA_VISIBLE_DEVICES decides what is
    visible), the YAML's count otherwise. Raises LaunchError (one line) for a launch that would fail."""
    machine = machine or Machine.this()
    try:
        cfg = load_accelerate_config(config_file)
    except Exception as exc:  # noqa: BLE001 - accelerate's loader: unknown keys, bad YAML, missing file
        from .errors import first_line

        raise LaunchError(f"{config_file}: accelerate cannot load it ({first_line(exc, 200)})") from None
    req = request_from_config(cfg)
    req.config_file = str(config_file)
    args: list[str] = []
    if not req.use_cpu and req.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED") and machine.cuda_devices:
        if req.distributed_type == "MULTI_GPU" and machine.cuda_devices < 2 and num_machines == 1:
            raise LaunchError(
                f"{config_file} needs at least 2 GPUs and {machine.cuda_devices} is visible; use "
                "accelerate_configs/single_gpu.yaml"
            )
        req.local_world_size = machine.cuda_devices
        req.world_size = machine.cuda_devices * num_machines
        args += ["--num_processes", str(req.world_size)]
    if num_machines > 1:
        args += ["--num_machines", str(num_machines)]
    check_launch(req, machine)  # QLoRA/full fine-tuning refusals come from the training script itself
    return args


def main(argv: list[str] | None = None) -> int:
    """train_gemma3.sh's pre-flight: `python -m pokemon_gemma.distributed CONFIG [--num_machines N]` prints
    the extra `accelerate launch` arguments, or one `error:` line and exit 1."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config_file")
    parser.add_argument("--num_machines", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        print(" ".join(launch_plan(args.config_file, num_machines=args.num_machines)))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
