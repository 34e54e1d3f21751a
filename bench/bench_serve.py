#!/usr/bin/env python
"""Benchmark the inference server over real HTTP on loopback, side by side in one run.

Starts scripts/inference_server.py (a child process on a free 127.0.0.1 port; the tiny random
Gemma 3 unless --model_path is given) and measures, with client-side wall-clock latencies:

1. `score` requests with 1 and with 8 concurrent clients: p50/p99 latency, requests/s, mean worker
   batch size (from /metrics);
2. `score` vs `generate` (greedy, --max_new_tokens) with 1 client: p50 latency and the ratio
   (target: score >= 3x faster);
3. a sliding-window session stream (window i = frames i..i+3) with the session frame cache on
   (`session_id` set) vs off (no `session_id`): vision-tower frames encoded per request (from the
   server's counter: target ~1 instead of 4) and p50 latency.

Bounded: a fixed number of requests per phase, every call with a timeout; loopback only.

    python bench/bench_serve.py [--model_path DIR] [--requests 40] [--generate_requests 8]
                                [--max_new_tokens 96] [--stream 24] [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from pokemon_gemma.serve.client import predict_payload, synthetic_stream
from pokemon_gemma.serve.launch import ServerProcess

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def counter(metrics_text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples if s.name == name)


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30, trust_env=False).text


def load_phase(url: str, payloads: list[dict], clients: int) -> dict:
    """Send `payloads` from `clients` threads (each its own connection); latencies in ms."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    todo = list(enumerate(payloads))

    def worker():
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    _, payload = todo.pop(0)
                start = time.perf_counter()
                r = c.post("/v1/predict", json=payload)
                ms = (time.perf_counter() - start) * 1000
                with lock:
                    (
                        latencies.append(ms)
                        if r.status_code == 200
                        else failures.append(f"{r.status_code} {r.text[:80]}")
                    )

    before = scrape(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = scrape(url)
    if failures:
        raise SystemExit(f"error: {len(failures)} requests failed, first: {failures[0]}")
    batches = counter(after, "pokemon_gemma_batch_size_requests_count") - counter(
        before, "pokemon_gemma_batch_size_requests_count"
    )
    batched = counter(after, "pokemon_gemma_batch_size_requests_sum") - counter(
        before, "pokemon_gemma_batch_size_requests_sum"
    )
    encoded = counter(after, "pokemon_gemma_vision_frames_encoded_total") - counter(
        before, "pokemon_gemma_vision_frames_encoded_total"
    )
    return {
        "requests": len(latencies),
        "clients": clients,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies),
        "requests_per_s": len(latencies) / wall,
        "mean_batch": batched / batches if batches else None,
        "vision_frames_per_request": encoded / len(latencies),
    }


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_path = args.model_path
    if model_path is None:
        from pokemon_gemma.tiny import build_tiny_model

        model_path = str(build_tiny_model(work / "tiny", seed=0))
    frames = synthetic_stream(args.stream + 3)
    windows = [frames[i : i + 4] for i in range(args.stream)]
    server_args = ["--model_path", model_path, "--log_level", "warning"]
    results: dict = {"model_path": model_path, "threads_per_server": args.threads}
    with ServerProcess(
        server_args, log_path=work / "server.log", cwd=work, env={"OMP_NUM_THREADS": str(args.threads)}
    ) as srv:
        url = srv.url
        load_phase(url, [predict_payload(w) for w in windows[:4]], 1)  # warm-up, not measured
        score = [predict_payload(windows[i % len(windows)]) for i in range(args.requests)]
        for clients in (1, 8):
            results[f"score_{clients}_clients"] = load_phase(url, score, clients)
            print(_row(f"score, {clients} client(s)", results[f"score_{clients}_clients"]), flush=True)
        gen = [
            {**predict_payload(windows[i % len(windows)], mode="generate"), "max_new_tokens": args.max_new_tokens}
            for i in range(args.generate_requests)
        ]
        results["generate_1_client"] = load_phase(url, gen, 1)
        print(_row(f"generate ({args.max_new_tokens} tok), 1 client", results["generate_1_client"]), flush=True)
        session = f"bench-{uuid.uuid4().hex[:8]}"
        results["stream_cache_on"] = load_phase(url, [predict_payload(w, session_id=session) for w in windows], 1)
        results["stream_cache_off"] = load_phase(url, [predict_payload(w) for w in windows], 1)
        for key, label in (
            ("stream_cache_on", "session stream, cache on"),
            ("stream_cache_off", "session stream, cache off"),
        ):
            print(_row(label, results[key]), flush=True)
    s1, s8, g1 = results["score_1_clients"], results["score_8_clients"], results["generate_1_client"]
    on, off = results["stream_cache_on"], results["stream_cache_off"]
    results["ratios"] = {
        "generate_p50_over_score_p50": g1["p50_ms"] / s1["p50_ms"],
        "score_rps_8_over_1_clients": s8["requests_per_s"] / s1["requests_per_s"],
        "vision_frames_per_request_cache_off_over_on": off["vision_frames_per_request"]
        / on["vision_frames_per_request"],
        "stream_p50_cache_off_over_on": off["p50_ms"] / on["p50_ms"],
    }
    return results


def _row(label: str, r: dict) -> str:
    batch = f"{r['mean_batch']:.2f}" if r["mean_batch"] else "-"
    return (
        f"{label:<32} n={r['requests']:<4} p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
        f"{r['requests_per_s']:7.2f} req/s  batch {batch:>5}  vision frames/req {r['vision_frames_per_request']:.2f}"
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [
        ("score\n1 client", "score_1_clients"),
        ("score\n8 clients", "score_8_clients"),
        ("generate\n1 client", "generate_1_client"),
        ("stream\ncache on", "stream_cache_on"),
        ("stream\ncache off", "stream_cache_off"),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(phases))
    ax1.bar([i - 0.2 for i in x], [results[k]["p50_ms"] for _, k in phases], 0.4, label="p50")
    ax1.bar([i + 0.2 for i in x], [results[k]["p99_ms"] for _, k in phases], 0.4, label="p99")
    ax1.set_xticks(list(x), [n for n, _ in phases])
    ax1.set_ylabel("latency (ms, client side)")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.bar(
        ["cache on", "cache off"],
        [
            results["stream_cache_on"]["vision_frames_per_request"],
            results["stream_cache_off"]["vision_frames_per_request"],
        ],
    )
    ax2.set_ylabel("vision-tower frames encoded per request")
    ax2.set_title("sliding-window session stream")
    fig.suptitle(f"inference server on {Path(results['model_path']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="model folder to serve (default: a tiny random Gemma 3)")
    parser.add_argument("--requests", type=int, default=40, help="score requests per concurrency level")
    parser.add_argument("--generate_requests", type=int, default=8, help="generate requests (1 client)")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="generation length for the generate phase")
    parser.add_argument("--stream", type=int, default=24, help="windows in the sliding-window session stream")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server process")
    parser.add_argument("--output_dir", default=None, help="also write bench_serve.json and bench_serve.png here")
    args = parser.parse_args(argv)
    if min(args.requests, args.generate_requests, args.stream, args.max_new_tokens) < 1:
        parser.error("--requests, --generate_requests, --stream and --max_new_tokens must be >= 1")
    results = run(args)
    r = results["ratios"]
    print(f"\ngenerate p50 / score p50:                     {r['generate_p50_over_score_p50']:.1f}x (target >= 3x)")
    print(f"score requests/s, 8 clients / 1 client:      {r['score_rps_8_over_1_clients']:.2f}x")
    print(
        f"vision frames/request, cache off / on:       {r['vision_frames_per_request_cache_off_over_on']:.2f}x "
        f"({results['stream_cache_off']['vision_frames_per_request']:.2f} vs "
        f"{results['stream_cache_on']['vision_frames_per_request']:.2f}; target ~4 vs ~1)"
    )
    print(f"stream p50 latency, cache off / on:          {r['stream_p50_cache_off_over_on']:.2f}x")
    if args.output_dir:
        from pokemon_gemma.fileio import atomic_write_json

        out = Path(args.output_dir)
        atomic_write_json(out / "bench_serve.json", results)
        plot(results, out / "bench_serve.png")
        print(f"wrote {out / 'bench_serve.json'} and {out / 'bench_serve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
