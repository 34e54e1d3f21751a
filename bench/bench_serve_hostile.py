#!/usr/bin/env python
"""Hostile-but-small images against the inference server: resident memory and /health latency.

Starts scripts/inference_server.py (a child process on a free 127.0.0.1 port, default flags; the tiny
random Gemma 3 unless --model_path is given) and sends, from --clients concurrent clients at once:

1. `bombs`: requests of ~60 KB, each with 4 palette PNGs declaring 4096x4096 pixels (64 Mpx decoded):
   the server must refuse them from the headers (413) without decoding a pixel;
2. `at_limit`: requests whose 4 palette PNGs (~5 KB each) declare 2048x2048 pixels, exactly the default
   per-request limit: every pixel is decoded (on the decoding threads) and downscaled to the model's
   input before the request is queued;
3. `normal`: ordinary 160x144 frames, for comparison.

Meanwhile a probe GETs /health every 50 ms. Reported per phase: status codes, wall time, the slowest
/health answer, and the server's resident memory: before, and the peak (VmHWM of /proc/<pid>/status,
the kernel's high-water mark, reset before each phase through /proc/<pid>/clear_refs).

    python bench/bench_serve_hostile.py [--model_path DIR] [--clients 16] [--rounds 1] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from pokemon_gemma.serve.client import palette_png, predict_payload, synthetic_stream
from pokemon_gemma.serve.launch import ServerProcess


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of `pid` (Linux >= 4.0; needs to own the process)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class HealthProbe:
    """GET /health every `interval_s` on its own connection; keeps the slowest answer."""

    def __init__(self, url: str, interval_s: float = 0.05):
        self.url, self.interval_s = url, interval_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    code = c.get("/health").status_code
                    problem = None if code == 200 else f"HTTP {code}"
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
                self.latencies.append(time.perf_counter() - start)
                if problem:
                    self.failures.append(problem)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max_s(self) -> float:
        return max(self.latencies, default=0.0)


def hostile_payloads() -> dict[str, dict]:
    bomb, limit = palette_png(4096, 4096), palette_png(2048, 2048)
    return {
        "bombs": predict_payload([bomb] * 4),
        "at_limit": predict_payload([limit] * 4),
        "normal": predict_payload(synthetic_stream(4)),
    }


def load_phase(url: str, pid: int, payload: dict, clients: int, rounds: int = 1) -> dict:
    """`clients` concurrent clients each send `payload` `rounds` times; memory and /health meanwhile."""
    body = json.dumps(payload).encode()
    before = memory_kb(pid)
    peak_reset = reset_peak(pid)

    def one(_):
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as c:
            return [
                c.post("/v1/predict", content=body, headers={"content-type": "application/json"}).status_code
                for _ in range(rounds)
            ]

    start = time.perf_counter()
    with HealthProbe(url) as probe, ThreadPoolExecutor(clients) as pool:
        codes = [code for batch in pool.map(one, range(clients)) for code in batch]
    wall = time.perf_counter() - start
    after = memory_kb(pid)
    return {
        "requests": len(codes),
        "request_bytes": len(body),
        "codes": dict(Counter(codes)),
        "wall_s": round(wall, 2),
        "rss_before_mb": round(before["VmRSS"] / 1024, 1),
        "rss_peak_mb": round(after["VmHWM"] / 1024, 1),
        "peak_is_this_phase": peak_reset,
        "health_max_ms": round(probe.max_s * 1000, 1),
        "health_checks": len(probe.latencies),
        "health_failures": len(probe.failures),
    }


def run(model_path: str | None, clients: int, rounds: int, server_args: list[str] | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_hostile_"))
    if model_path is None:
        from pokemon_gemma.tiny import build_tiny_model

        model_path = str(build_tiny_model(work / "tiny", seed=0))
    payloads = hostile_payloads()
    results: dict = {"model_path": model_path, "clients": clients, "rounds": rounds}
    with ServerProcess(
        ["--model_path", model_path, "--log_level", "warning", *(server_args or [])],
        log_path=work / "server.log",
        cwd=work,
    ) as srv:
        pid = srv.proc.pid
        for name in ("normal", "bombs", "at_limit"):
            results[name] = load_phase(srv.url, pid, payloads[name], clients, rounds)
            r = results[name]
            print(
                f"{name:<9} {r['requests']} x {r['request_bytes'] / 1024:.0f} KB  codes {r['codes']}  "
                f"{r['wall_s']:.1f} s  RSS {r['rss_before_mb']:.0f} MB -> peak {r['rss_peak_mb']:.0f} MB  "
                f"/health max {r['health_max_ms']:.0f} ms ({r['health_checks']} checks, "
                f"{r['health_failures']} failed)",
                flush=True,
            )
        log = srv.log()
    results["server_log_has_traceback"] = "Traceback" in log
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="model folder to serve (default: a tiny random Gemma 3)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients per phase (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="requests per client per phase (default 1)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results = run(args.model_path, args.clients, args.rounds)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
