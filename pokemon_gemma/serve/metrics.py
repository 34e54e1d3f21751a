"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Names follow the Prometheus conventions: one prefix (`pokemon_gemma_`), base units in the name
(`_seconds`), `_total` on counters, `_info` for the constant label set; errors are the request counter's
`code` label (a 5xx ratio is `code=~"5.."` over all), never a second counter. The default process and
platform collectors (`process_*`, `python_*`) are registered too. deploy/prometheus/alerts.yml alerts on
these names. `*_created` series are switched off (they would double the series for nothing here).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
PREFIX = "pokemon_gemma_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CLIENT_CLOSED = 499  # the status recorded when the client hung up before its request was read


class ServerMetrics:
    def __init__(self, backend: str, model_version: str):
        # No `*_created` gauge beside every counter and histogram (process-wide; the server is its own process).
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            PREFIX + "http_requests",
            f"HTTP requests by endpoint and status code ({CLIENT_CLOSED}: the client closed the connection first)",
            ["endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(PREFIX + "http_requests_in_flight", "HTTP requests being served", registry=r)
        self.predictions = Counter(PREFIX + "predictions", "Model calls by mode", ["mode"], registry=r)
        self.tokens = Counter(
            PREFIX + "tokens", "Tokens of answered model calls by type (prompt, completion)", ["type"], registry=r
        )
        self.cache_hits = Counter(
            PREFIX + "frame_cache_hits", "Session frames whose vision features came from the cache", registry=r
        )
        self.cache_misses = Counter(PREFIX + "frame_cache_misses", "Session frames not in the cache", registry=r)
        self.frames_encoded = Counter(
            PREFIX + "vision_frames_encoded", "Frames run through the vision tower", registry=r
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size_requests", "Requests per model-worker batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.score_batch_size = Histogram(
            PREFIX + "score_batch_size_requests",
            "Score requests per batched language-model pass (one prompt pass + one answer pass)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(PREFIX + "queue_requests", "Model requests being decoded, waiting or running", registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 once the model is loaded and warmed up", registry=r)
        self.model_info = Gauge(
            PREFIX + "model_info", "The served model (value is always 1)", ["model_version", "backend"], registry=r
        )
        self.model_info.labels(model_version=model_version, backend=backend).set(1)

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
