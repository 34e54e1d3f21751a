"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, backend: str, model_version: str):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pokemon_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.errors = Counter(
            "pokemon_errors",
            "HTTP error responses (status >= 400) by endpoint and code",
            ["endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "pokemon_request_latency_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter("pokemon_predictions", "Model calls by mode", ["mode"], registry=r)
        self.cache_hits = Counter(
            "pokemon_frame_cache_hits", "Session frames whose vision features came from the cache", registry=r
        )
        self.cache_misses = Counter("pokemon_frame_cache_misses", "Session frames not in the cache", registry=r)
        self.frames_encoded = Counter(
            "pokemon_vision_frames_encoded", "Frames run through the vision tower", registry=r
        )
        self.batch_size = Histogram(
            "pokemon_batch_size", "Requests per worker batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.score_batch_size = Histogram(
            "pokemon_score_batch_size",
            "Score requests per batched language-model pass (one prompt pass + one answer pass)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("pokemon_inflight_requests", "Requests being served", registry=r)
        self.queue = Gauge("pokemon_queue_depth", "Model requests waiting or running", registry=r)
        self.ready = Gauge("pokemon_ready", "1 once the model is loaded and warmed up", registry=r)
        self.model_info = Gauge(
            "pokemon_model_info", "The served model (value is always 1)", ["model_version", "backend"], registry=r
        )
        self.model_info.labels(model_version=model_version, backend=backend).set(1)

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
