#!/usr/bin/env python
"""Benchmark the inference server over real HTTP on loopback, side by side in one run.

Starts scripts/inference_server.py (a child process on a free 127.0.0.1 port; the tiny random
Gemma 3 unless --model_path is given) and measures, with client-side wall-clock latencies:

1. many agents, one model: 1, 4, 8 and 16 concurrent clients (--clients), each an agent streaming
   its own game (its own session and frames; window i = frames i..i+3, so ~1 new frame per request):
   requests/s, p50/p99 latency, the worker's batch sizes (from /metrics: requests per worker batch
   and score requests per batched language-model pass). The levels run interleaved over --repeats
   rounds; requests/s is the median round, latencies are pooled;
2. independent `score` requests (no session: 4 frames encoded each) from 1 and 8 clients;
3. `score` vs `generate` (greedy, --max_new_tokens) with 1 client: p50 latency and the ratio;
4. a sliding-window session stream with the session frame cache on (`session_id` set) vs off (no
   `session_id`): vision-tower frames per request (~1 vs 4) and p50 latency: the score-mode p50
   with 3 of 4 frames cached and with all 4 frames encoded.

With --baseline_checkout DIR (another checkout of this project, e.g. `git archive <commit>` unpacked)
a second server runs that code on the same model, and the 1- and 8-client agent levels run on it too,
interleaved with this checkout's: the 1-client p50 before/after and the 8/1-client ratio of each.

Bounded: a fixed number of requests per phase, every call with a timeout; loopback only.

    python bench/bench_serve.py [--model_path DIR] [--requests 48] [--clients 1,4,8,16] [--repeats 3]
                                [--max_batch 16] [--batch_wait_ms 2] [--baseline_checkout DIR]
                                [--generate_requests 8] [--max_new_tokens 96] [--stream 24] [--output_dir DIR]

On a GPU (random-weight gemma-3-4b, real shapes, no download):

    python bench/make_random_model.py --size 4b --output_dir /tmp/gemma3-4b-random
    python bench/bench_serve.py --model_path /tmp/gemma3-4b-random --precision bf16 --requests 64 \\
        --output_dir /tmp/bench_serve_4b     # phase 4 gives the score p50 for 4 frames and for 1 new frame
    python bench/bench_eval.py --model_path /tmp/gemma3-4b-random --precision bf16 --samples 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import httpx

from pokemon_gemma.serve.client import encode_image, predict_payload, synthetic_frame, synthetic_stream
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


def load_phase(url: str, queues: list[list[dict]]) -> dict:
    """One thread (and connection) per queue, each sending its payloads in order; latencies in ms."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(payloads):
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as c:
            for payload in payloads:
                start = time.perf_counter()
                r = c.post("/v1/predict", json=payload)
                ms = (time.perf_counter() - start) * 1000
                with lock:
                    if r.status_code == 200:
                        latencies.append(ms)
                    else:
                        failures.append(f"{r.status_code} {r.text[:80]}")

    before = scrape(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = scrape(url)
    if failures:
        raise SystemExit(f"error: {len(failures)} requests failed, first: {failures[0]}")

    def delta(name):
        return counter(after, name) - counter(before, name)

    batches = delta("pokemon_gemma_score_batch_size_requests_count")
    scored = delta("pokemon_gemma_score_batch_size_requests_sum")
    worker_batches = delta("pokemon_gemma_batch_size_requests_count")
    worker_batched = delta("pokemon_gemma_batch_size_requests_sum")
    return {
        "requests": len(latencies),
        "clients": len(queues),
        "latencies_ms": latencies,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies),
        "requests_per_s": len(latencies) / wall,
        "mean_batch": worker_batched / worker_batches if worker_batches else None,
        "mean_score_batch": scored / batches if batches else None,
        "vision_frames_per_request": delta("pokemon_gemma_vision_frames_encoded_total") / len(latencies),
    }


def agent_queues(clients: int, requests: int, tag: str) -> list[list[dict]]:
    """`clients` agents sharing `requests` requests; each streams its own frames in its own session."""
    per = [requests // clients + (k < requests % clients) for k in range(clients)]
    queues = []
    for k, n in enumerate(per):
        base = zlib.crc32(f"{tag}/{k}".encode()) % 10_000 * 100  # distinct frames per agent and round
        frames = [encode_image(synthetic_frame(base + i)) for i in range(n + 3)]
        session = f"{tag}-agent{k}-{uuid.uuid4().hex[:6]}"
        queues.append([predict_payload(frames[i : i + 4], session_id=session) for i in range(n)])
    return queues


def pooled(rounds: list[dict]) -> dict:
    """Rounds of one level: median requests/s, latencies pooled over the rounds."""
    latencies = [ms for r in rounds for ms in r["latencies_ms"]]
    return {
        "clients": rounds[0]["clients"],
        "requests": len(latencies),
        "rounds": len(rounds),
        "requests_per_s": statistics.median(r["requests_per_s"] for r in rounds),
        "requests_per_s_rounds": [r["requests_per_s"] for r in rounds],
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": statistics.fmean(r["mean_batch"] or 0 for r in rounds),
        "mean_score_batch": statistics.fmean(r["mean_score_batch"] or 0 for r in rounds),
        "vision_frames_per_request": statistics.fmean(r["vision_frames_per_request"] for r in rounds),
    }


def server_args(args, model_path: str) -> list[str]:
    out = ["--model_path", model_path, "--log_level", "warning", "--mixed_precision", args.precision]
    return out + ["--max_batch", str(args.max_batch), "--batch_wait_ms", str(args.batch_wait_ms), "--max_queue", "256"]


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_path = args.model_path
    if model_path is None:
        from pokemon_gemma.tiny import build_tiny_model

        model_path = str(build_tiny_model(work / "tiny", seed=0))
    frames = synthetic_stream(args.stream + 3)
    windows = [frames[i : i + 4] for i in range(args.stream)]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    results: dict = {
        "model_path": model_path,
        "threads_per_server": args.threads,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "repeats": args.repeats,
        "load_average_start": os.getloadavg(),
    }
    servers = {"new": ServerProcess(server_args(args, model_path), log_path=work / "server.log", cwd=work, env=env)}
    if args.baseline_checkout:
        base = Path(args.baseline_checkout).resolve()
        # The baseline's own flags: only those every version of the server has.
        servers["baseline"] = ServerProcess(
            ["--model_path", model_path, "--log_level", "warning", "--mixed_precision", args.precision],
            log_path=work / "baseline.log",
            cwd=work,
            env={**env, "PYTHONPATH": str(base)},
            script=base / "scripts" / "inference_server.py",
        )
    try:
        for srv in servers.values():
            srv.wait_ready()
            load_phase(srv.url, agent_queues(2, 8, "warmup"))  # warm-up, not measured
        rounds: dict[str, list[dict]] = {}
        for r in range(args.repeats):
            for clients in args.clients:
                for name, srv in servers.items():
                    if name == "baseline" and clients not in (1, 8):
                        continue
                    key = f"{name}_agents_{clients}"
                    rounds.setdefault(key, []).append(
                        load_phase(srv.url, agent_queues(clients, args.requests, f"r{r}c{clients}"))
                    )
                    print(_row(f"round {r + 1}: {name}, {clients} agent(s)", rounds[key][-1]), flush=True)
        for key, rs in rounds.items():
            results[key] = pooled(rs)
        url = servers["new"].url
        score = [predict_payload(windows[i % len(windows)]) for i in range(args.requests)]
        for clients in (1, 8):
            queues = [score[k::clients] for k in range(clients)]
            results[f"independent_{clients}_clients"] = load_phase(url, queues)
        gen = [
            {**predict_payload(windows[i % len(windows)], mode="generate"), "max_new_tokens": args.max_new_tokens}
            for i in range(args.generate_requests)
        ]
        results["generate_1_client"] = load_phase(url, [gen])
        session = f"bench-{uuid.uuid4().hex[:8]}"
        results["stream_cache_on"] = load_phase(url, [[predict_payload(w, session_id=session) for w in windows]])
        results["stream_cache_off"] = load_phase(url, [[predict_payload(w) for w in windows]])
    finally:
        for srv in servers.values():
            srv.stop()
    for phase in results.values():
        if isinstance(phase, dict):
            phase.pop("latencies_ms", None)
    results["load_average_end"] = os.getloadavg()
    new = {c: results[f"new_agents_{c}"] for c in args.clients}
    one = new[min(args.clients)]
    ratios = {
        f"agents_rps_{c}_over_{min(args.clients)}_clients": new[c]["requests_per_s"] / one["requests_per_s"]
        for c in args.clients
    }
    ratios |= {
        "independent_rps_8_over_1_clients": results["independent_8_clients"]["requests_per_s"]
        / results["independent_1_clients"]["requests_per_s"],
        "generate_p50_over_score_p50": results["generate_1_client"]["p50_ms"]
        / results["independent_1_clients"]["p50_ms"],
        "vision_frames_per_request_cache_off_over_on": results["stream_cache_off"]["vision_frames_per_request"]
        / results["stream_cache_on"]["vision_frames_per_request"],
        "stream_p50_cache_off_over_on": results["stream_cache_off"]["p50_ms"] / results["stream_cache_on"]["p50_ms"],
    }
    if "baseline_agents_1" in results:
        b1, b8 = results["baseline_agents_1"], results["baseline_agents_8"]
        ratios["agents_p50_1_client_new_over_baseline"] = results["new_agents_1"]["p50_ms"] / b1["p50_ms"]
        ratios["baseline_agents_rps_8_over_1_clients"] = b8["requests_per_s"] / b1["requests_per_s"]
        if "new_agents_8" in results:
            ratios["agents_rps_8_clients_new_over_baseline"] = (
                results["new_agents_8"]["requests_per_s"] / b8["requests_per_s"]
            )
    results["ratios"] = ratios
    return results


def _row(label: str, r: dict) -> str:
    batch = f"{r['mean_batch']:.2f}" if r.get("mean_batch") else "-"
    score_batch = f"{r['mean_score_batch']:.2f}" if r.get("mean_score_batch") else "-"
    return (
        f"{label:<34} n={r['requests']:<4} p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
        f"{r['requests_per_s']:7.2f} req/s  batch {batch:>5} (scored together {score_batch:>5})  "
        f"vision frames/req {r['vision_frames_per_request']:.2f}"
    )


def plot(results: dict, clients: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rps = [results[f"new_agents_{c}"]["requests_per_s"] for c in clients]
    ax1.plot(clients, rps, "o-", label="this checkout")
    if "baseline_agents_1" in results:
        ax1.plot([1, 8], [results[f"baseline_agents_{c}"]["requests_per_s"] for c in (1, 8)], "s--", label="baseline")
    ax1.set_xlabel("concurrent clients (agents)")
    ax1.set_ylabel("requests/s")
    ax1.set_xticks(clients)
    ax1.legend()
    x = range(len(clients))
    ax2.bar([i - 0.2 for i in x], [results[f"new_agents_{c}"]["p50_ms"] for c in clients], 0.4, label="p50")
    ax2.bar([i + 0.2 for i in x], [results[f"new_agents_{c}"]["p99_ms"] for c in clients], 0.4, label="p99")
    ax2.set_xticks(list(x), [str(c) for c in clients])
    ax2.set_xlabel("concurrent clients (agents)")
    ax2.set_ylabel("latency (ms, client side)")
    ax2.legend()
    fig.suptitle(f"inference server on {Path(results['model_path']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="model folder to serve (default: a tiny random Gemma 3)")
    parser.add_argument("--requests", type=int, default=48, help="score requests per level and round")
    parser.add_argument(
        "--clients",
        type=lambda s: sorted({int(x) for x in s.split(",")}),
        default=[1, 4, 8, 16],
        help="comma-separated concurrency levels (agents)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the agent levels")
    parser.add_argument("--max_batch", type=int, default=16, help="the server's --max_batch")
    parser.add_argument("--batch_wait_ms", type=float, default=2.0, help="the server's --batch_wait_ms")
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="the server's dtype")
    parser.add_argument("--baseline_checkout", default=None, help="also serve this checkout's code (before/after)")
    parser.add_argument("--generate_requests", type=int, default=8, help="generate requests (1 client)")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="generation length for the generate phase")
    parser.add_argument("--stream", type=int, default=24, help="windows in the sliding-window session stream")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server process")
    parser.add_argument("--output_dir", default=None, help="also write bench_serve.json and bench_serve.png here")
    args = parser.parse_args(argv)
    if min(args.requests, args.generate_requests, args.stream, args.max_new_tokens, args.repeats, *args.clients) < 1:
        parser.error("--requests, --clients, --repeats, --generate_requests, --stream, --max_new_tokens must be >= 1")
    if args.baseline_checkout and not (Path(args.baseline_checkout) / "scripts" / "inference_server.py").is_file():
        parser.error(f"--baseline_checkout {args.baseline_checkout}: no scripts/inference_server.py there")
    results = run(args)
    print()
    for c in args.clients:
        print(_row(f"{c} agent(s), median of {args.repeats}", results[f"new_agents_{c}"]))
    for key in ("baseline_agents_1", "baseline_agents_8"):
        if key in results:
            print(_row(key.replace("_", " "), results[key]))
    for key, label in (
        ("independent_1_clients", "independent score, 1 client"),
        ("independent_8_clients", "independent score, 8 clients"),
        ("generate_1_client", f"generate ({args.max_new_tokens} tok), 1 client"),
        ("stream_cache_on", "session stream, cache on"),
        ("stream_cache_off", "session stream, cache off"),
    ):
        print(_row(label, results[key]))
    print()
    for name, value in results["ratios"].items():
        print(f"{name:<48} {value:6.2f}x")
    load = results["load_average_start"], results["load_average_end"]
    print(
        f"load average (1/5/15 min): start {load[0][0]:.1f}/{load[0][1]:.1f}/{load[0][2]:.1f}, "
        f"end {load[1][0]:.1f}/{load[1][1]:.1f}/{load[1][2]:.1f}"
    )
    if args.output_dir:
        from pokemon_gemma.fileio import atomic_write_json

        out = Path(args.output_dir)
        atomic_write_json(out / "bench_serve.json", results)
        plot(results, args.clients, out / "bench_serve.png")
        print(f"wrote {out / 'bench_serve.json'} and {out / 'bench_serve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
