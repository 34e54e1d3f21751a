"""Find the largest micro-batch that trains: real steps on the dataset's worst-case samples.

A probe is what training does (train.py): the same model set-up (`build_model`), the same collator,
forward + backward of `loss_sum / n_tokens` under the accelerate autocast, gradient clipping and an
AdamW step (2+ steps, so the optimizer state is in memory during a forward/backward). Batches are
built from the longest samples (all frames, every image soft token), so a size that fits here fits
every step of training.

Memory: CUDA measures `max_memory_allocated` in this process (an OOM is caught, memory freed,
the search continues). On CPU each probe runs in a fresh spawned child whose peak RSS (`VmHWM`,
which unlike `ru_maxrss` is not inherited across exec) is its own, so no probe's memory leaks into
the next, and a child killed by the kernel's OOM killer is a "does not fit", not a crash.

Search: 1, 2, 4, ... up to --max_batch_size, then a binary search between the last size that fit
and the first that did not. "Fits" = no OOM and peak ≤ safety_margin × budget (budget =
--max_memory_gb, else the device's memory).
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import Settings
from .dataset import Record
from .errors import first_line
from .progress import progress

GIB = 2**30
ADVICE = (
    "use --use_qlora (4-bit base), --gradient_checkpointing, a shorter --max_seq_length, "
    "or --frame_layout grid (1/4 of the image tokens)"
)


class FinderError(RuntimeError):
    """The search cannot produce a recommendation; the message says what to change."""


@dataclass
class ProbeResult:
    batch_size: int
    fits: bool
    oom: bool = False
    peak_memory_gb: float | None = None
    step_time_s: float | None = None
    samples_per_s: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def fitting(cls, batch_size: int, step_time: float, peak: float | None) -> ProbeResult:
        """A probe whose steps ran: their time and peak memory."""
        return cls(
            batch_size,
            True,
            peak_memory_gb=peak,
            step_time_s=step_time,
            samples_per_s=batch_size / step_time if step_time > 0 else None,
        )


# --------------------------------------------------------------------------- devices and memory
def resolve_device(name: str = "auto") -> str:
    from .modeling import default_device

    return default_device() if name == "auto" else name


def device_memory_gb(device: str) -> float:
    """Total memory the probes may use when no --max_memory_gb is given."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / GIB
    if device == "mps":
        return torch.mps.recommended_max_memory() / GIB
    import psutil

    return psutil.virtual_memory().available / GIB


def peak_rss_gb() -> float:
    """This process's peak resident memory. Linux VmHWM belongs to the current address space
    (ru_maxrss would include the parent's memory copied in at fork/exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GIB


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError) or isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


# --------------------------------------------------------------------------- worst-case samples
def worst_case_records(records: list[Record], collator, count: int) -> list[Record]:
    """The `count` longest trainable samples (token length incl. image tokens), cycled if fewer."""

    lengths = [
        (collator.sample_length(r), i)
        for i, r in enumerate(progress(records, desc="measuring samples", unit="sample", leave=False))
    ]
    order = [i for _, i in sorted(lengths, key=lambda t: (-t[0], t[1]))]
    return [records[order[k % len(order)]] for k in range(count)]


# --------------------------------------------------------------------------- one probe
def with_precision(s: Settings, device: str) -> Settings:
    """The training loop's own precision: CLI > environment > .env > accelerate config > device default."""
    from .distributed import detect_device, precision_for

    try:
        precision, _ = precision_for(s.mixed_precision, device=detect_device() if device == "cuda" else device)
    except ValueError as exc:
        raise FinderError(str(exc)) from None
    return replace(s, mixed_precision=precision)


class Prober:
    """Holds a loaded model and runs training steps of a given micro-batch size on it."""

    def __init__(self, s: Settings, device: str):
        from accelerate import Accelerator

        from .collate import Collator
        from .modeling import DTYPES
        from .train import build_model

        s = with_precision(s, device)
        self.s, self.device = s, device
        self.accelerator = Accelerator(mixed_precision=s.mixed_precision, cpu=device == "cpu")
        self.model, processor = build_model(s)
        dtype = DTYPES["bf16"] if s.mixed_precision == "bf16" else torch.float32
        self.collator = Collator(processor, s.max_seq_length, s.frame_layout, pixel_dtype=dtype)

    def steps(self, records: list[Record], batch_size: int, n_steps: int) -> tuple[float, float]:
        """Run `n_steps` optimizer steps; return (mean step time after the first, peak memory GiB)."""
        acc, s = self.accelerator, self.s
        batch = self.collator([records[k % len(records)] for k in range(batch_size)])
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
        model, optimizer = acc.prepare(self.model, optimizer)
        model.train()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, mps_peak = [], 0
        try:
            for _ in range(max(2, n_steps)):
                if self.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                on_device = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.autocast():
                    value, n_tokens = _loss_sum(model, on_device)
                    acc.backward(value / max(n_tokens, 1))
                if s.max_grad_norm > 0:
                    acc.clip_grad_norm_(trainable, s.max_grad_norm)
                if self.device == "mps":  # no peak counter on MPS: sample after backward
                    mps_peak = max(mps_peak, torch.mps.driver_allocated_memory())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del on_device, value
                if self.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        finally:
            optimizer.zero_grad(set_to_none=True)
            acc.free_memory()  # forgets the prepared optimizer (its state) before the next probe
            del optimizer
        step_time = sum(times[1:]) / len(times[1:])  # the first step allocates and warms up
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / GIB
        elif self.device == "mps":
            peak = mps_peak / GIB
        else:
            peak = peak_rss_gb()
        return step_time, peak


def _loss_sum(model, batch):
    from .loss import loss_sum

    return loss_sum(model, batch)


def _child_probe(conn, s: Settings, records: list[dict], batch_size: int, n_steps: int) -> None:
    """Entry point of a spawned CPU probe: load, train, report (kind, payload) through the pipe."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    from .modeling import ModelLoadError

    try:
        try:
            prober = Prober(s, "cpu")
        except ModelLoadError as exc:
            conn.send(("load_error", str(exc)))
            return
        step_time, peak = prober.steps([Record(**r) for r in records], batch_size, n_steps)
        conn.send(("ok", (step_time, peak)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {first_line(exc, 300)}"))
    finally:
        conn.close()


# Modules every probe needs, imported once by the fork server so each probe starts in a fraction of
# the time. The server never runs a probe, so the peak it hands down is the same for every child.
_PRELOAD = ["torch", "transformers", "peft", "accelerate", "pokemon_gemma.train", "pokemon_gemma.batch_finder"]


def probe_context():
    """Fresh-process context: fork server (POSIX, preloaded) or spawn (Windows)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def probe_in_child(s: Settings, records: list[Record], batch_size: int, n_steps: int) -> ProbeResult:
    """One CPU probe in a fresh spawned process; returns its own peak RSS."""
    ctx = probe_context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_probe, args=(child, s, [r.to_dict() for r in records], batch_size, n_steps))
    proc.start()
    child.close()
    message = None
    try:
        message = parent.recv()
    except EOFError:  # the child died without a word: killed (OOM killer) or crashed
        pass
    proc.join()
    if message is None:
        if proc.exitcode == -9:  # SIGKILL: the kernel's OOM killer
            return ProbeResult(
                batch_size,
                fits=False,
                oom=True,
                note=f"probe process killed by signal {-proc.exitcode} (likely out of memory)",
            )
        raise FinderError(
            f"probe of batch size {batch_size}: the probe process exited with code {proc.exitcode} "
            "without a result (see the messages above)"
        )
    kind, payload = message
    if kind == "ok":
        step_time, peak = payload
        return ProbeResult.fitting(batch_size, step_time, peak)
    if kind == "oom":
        return ProbeResult(batch_size, False, oom=True, note=payload)
    if kind == "load_error":
        from .modeling import ModelLoadError

        raise ModelLoadError(payload)
    raise FinderError(f"probe of batch size {batch_size} failed: {payload}")


def probe_in_process(prober: Prober, records: list[Record], batch_size: int, n_steps: int) -> ProbeResult:
    """One CUDA/MPS probe on the already-loaded model; an OOM frees memory and reports no fit."""
    oom_note = None
    try:
        step_time, peak = prober.steps(records, batch_size, n_steps)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        oom_note = f"{type(exc).__name__}: {first_line(exc, 160)}"
    if oom_note is not None:  # cleaned outside `except`: the traceback pins the activations
        prober.model.zero_grad(set_to_none=True)
        free_device_memory(prober.device)
        return ProbeResult(batch_size, False, oom=True, note=oom_note)
    free_device_memory(prober.device)
    return ProbeResult.fitting(batch_size, step_time, peak)


# --------------------------------------------------------------------------- search
def search(probe: Callable[[int], ProbeResult], max_batch_size: int, limit_gb: float | None) -> list[ProbeResult]:
    """Doubling from 1, then binary search between the last fit and the first failure.

    A probe that ran but whose peak exceeds `limit_gb` counts as not fitting."""
    results: dict[int, ProbeResult] = {}

    def run(b: int) -> bool:
        r = probe(b)
        if r.fits and limit_gb is not None and r.peak_memory_gb is not None and r.peak_memory_gb > limit_gb:
            r = replace(r, fits=False, note=f"peak {r.peak_memory_gb:.3f} GiB > limit {limit_gb:.3f} GiB")
        results[b] = r
        return r.fits

    last_fit, first_fail, b = 0, None, 1
    while b <= max_batch_size:
        if run(b):
            last_fit = b
            if b == max_batch_size:
                break
            b = min(2 * b, max_batch_size)
        else:
            first_fail = b
            break
    if last_fit and first_fail:
        lo, hi = last_fit, first_fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(mid):
                lo = mid
            else:
                hi = mid
    return [results[k] for k in sorted(results)]


def recommend(results: list[ProbeResult], target_effective_batch: int, num_processes: int) -> dict | None:
    fitting = [r for r in results if r.fits]
    if not fitting:
        return None
    best = max(fitting, key=lambda r: r.batch_size)
    grad_accum = max(1, math.ceil(target_effective_batch / (best.batch_size * num_processes)))
    return {
        "batch_size": best.batch_size,
        "grad_accum": grad_accum,
        "effective_batch": best.batch_size * grad_accum * num_processes,
        "peak_memory_gb": best.peak_memory_gb,
        "samples_per_s": best.samples_per_s,
    }


def find_batch_size(
    s: Settings,
    *,
    max_batch_size: int = 64,
    target_effective_batch: int = 16,
    max_memory_gb: float | None = None,
    safety_margin: float = 0.9,
    num_processes: int = 1,
    probe_steps: int = 3,
    device: str = "auto",
) -> dict:
    """Run the search; return the report (results, recommendation). Raises FinderError/RecordError/
    JsonlError/ModelLoadError with a one-line message."""
    from .collate import Collator
    from .dataset import load_records
    from .modeling import load_processor
    from .train import filter_trainable_samples

    if max_batch_size < 1:
        raise FinderError("--max_batch_size must be at least 1")
    records = load_records(s.dataset_path)
    device = resolve_device(device)
    s = with_precision(s, device)
    processor = load_processor(s.model_name, token=s.hub_token, image_tokens=s.image_tokens)
    collator = Collator(processor, s.max_seq_length, s.frame_layout)
    try:
        trainable = filter_trainable_samples(records, collator, Path(s.dataset_path).name)
    except Exception as exc:  # TrainingError: nothing fits --max_seq_length
        raise FinderError(f"{exc} ({ADVICE})") from None
    worst = worst_case_records(trainable, collator, max_batch_size)
    distinct = {r.sample_id: r for r in worst}
    for r in distinct.values():  # a frame that does not decode fails here, not as a "no fit"
        collator.encode(r)
    budget = max_memory_gb if max_memory_gb is not None else device_memory_gb(device)
    limit = budget * safety_margin

    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("probing batch sizes", total=None)
        if device == "cpu":

            def probe(b: int) -> ProbeResult:
                progress.update(task, description=f"probing batch size {b} (child process)")
                return probe_in_child(s, worst, b, probe_steps)
        else:
            prober = Prober(s, device)

            def probe(b: int) -> ProbeResult:
                progress.update(task, description=f"probing batch size {b}")
                return probe_in_process(prober, worst, b, probe_steps)

        results = search(probe, max_batch_size, limit)

    lengths = [collator.sample_length(r) for r in distinct.values()]
    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else device,
        "memory_measure": {
            "cuda": "torch.cuda.max_memory_allocated",
            "mps": "mps driver allocated (sampled)",
            "cpu": "peak RSS of a child process per probe",
        }.get(device, device),
        "budget_gb": budget,
        "safety_margin": safety_margin,
        "limit_gb": limit,
        "max_batch_size": max_batch_size,
        "target_effective_batch": target_effective_batch,
        "num_processes": num_processes,
        "probe_steps": probe_steps,
        "settings": {
            k: getattr(s, k)
            for k in (
                "model_name",
                "dataset_path",
                "use_peft",
                "use_qlora",
                "gradient_checkpointing",
                "max_seq_length",
                "frame_layout",
                "image_tokens",
                "mixed_precision",
                "lora_r",
                "lora_targets",
            )
        },
        "worst_case": {
            "sample_ids": sorted(distinct),
            "max_tokens": max(lengths),
            "tokens_used": min(max(lengths), s.max_seq_length),
        },
        "results": [r.to_dict() for r in results],
        "recommendation": recommend(results, target_effective_batch, num_processes),
    }
    return report


def no_fit_message(report: dict) -> str:
    first = report["results"][0] if report["results"] else {}
    why = first.get("note") or "out of memory"
    return (
        f"even batch size 1 does not fit on {report['device']} (limit {report['limit_gb']:.2f} GiB: {why}); "
        f"to use less memory: {ADVICE}"
    )


# --------------------------------------------------------------------------- .env update
def update_env_file(path: str | Path, values: dict[str, object]) -> Path:
    """Set KEY=value for each key, keeping every other byte of the file; append missing keys.

    A key's existing line keeps its `export ` prefix; written atomically, file mode kept."""
    from .fileio import atomic_write_bytes

    path = Path(path)
    text = path.read_bytes().decode("utf-8") if path.exists() else ""
    lines = text.splitlines(keepends=True)
    seen = set()
    for i, line in enumerate(lines):
        for key, value in values.items():
            m = re.match(rf"^(\s*(?:export\s+)?){re.escape(key)}\s*=", line)
            if m:
                ending = line[len(line.rstrip("\r\n")) :]
                lines[i] = f"{m.group(1)}{key}={value}{ending or ''}"
                seen.add(key)
    missing = [k for k in values if k not in seen]
    if missing:
        newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        lines += [f"{k}={values[k]}{newline}" for k in missing]
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    if mode is not None:
        os.chmod(path, mode)
    return path


# --------------------------------------------------------------------------- presentation
def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"batch-size probes on {report['device_name']} "
        f"(limit {report['limit_gb']:.2f} GiB = {report['safety_margin']:.0%} of {report['budget_gb']:.2f})"
    )
    for col in ("batch", "fits", "peak GiB", "% of budget", "step s", "samples/s", "note"):
        table.add_column(col, justify="right" if col not in ("fits", "note") else "left")
    for r in report["results"]:
        peak = r["peak_memory_gb"]
        table.add_row(
            str(r["batch_size"]),
            "yes" if r["fits"] else ("OOM" if r["oom"] else "no"),
            f"{peak:.3f}" if peak is not None else "-",
            f"{100 * peak / report['budget_gb']:.0f}%" if peak is not None else "-",
            f"{r['step_time_s']:.3f}" if r["step_time_s"] else "-",
            f"{r['samples_per_s']:.2f}" if r["samples_per_s"] else "-",
            r["note"][:60],
        )
    console.print(table)
    rec = report["recommendation"]
    if rec:
        console.print(
            f"recommended: BATCH_SIZE={rec['batch_size']} GRAD_ACCUM={rec['grad_accum']} "
            f"(effective batch {rec['effective_batch']} over {report['num_processes']} process(es); "
            f"target {report['target_effective_batch']})"
        )
