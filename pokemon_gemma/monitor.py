"""Health monitor for the inference server.

Each check polls /health, /ready, /metrics and sends one real /v1/predict probe, then writes one
JSON line (status, reasons, latencies, error rate from the metrics deltas). A server that cannot be
reached, is not ready, answers slowly or returns server errors is unhealthy: a down server is never
reported healthy. Optional webhook: a JSON POST whenever the status changes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from .dataset import BUTTONS
from .serve.client import auth_headers, predict_payload, synthetic_stream

HEALTHY, UNHEALTHY = "healthy", "unhealthy"


@dataclass
class Thresholds:
    latency_ms: float = 5000.0  # probe latency above this is "slow"
    error_rate: float = 0.05  # share of requests answered 5xx since the previous check


@dataclass
class MetricsSnapshot:
    requests: float = 0.0
    server_errors: float = 0.0  # 5xx
    client_errors: float = 0.0  # 4xx
    model_version: str | None = None
    resident_memory_bytes: float | None = None  # the server process's RSS


# The server's metric names (serve/metrics.py; deploy/prometheus/alerts.yml uses the same).
REQUESTS_METRIC = "pokemon_gemma_http_requests_total"
MODEL_INFO_METRIC = "pokemon_gemma_model_info"
RESIDENT_MEMORY_METRIC = "process_resident_memory_bytes"


def parse_metrics(text: str) -> MetricsSnapshot:
    """Totals of the API endpoints (/v1/*) from the server's Prometheus text (see serve/metrics.py);
    /health, /ready and /metrics are left out (a 503 from /ready while warming up is not an error).
    A client that hung up (code 499) is a client error, never a server error."""
    from prometheus_client.parser import text_string_to_metric_families

    snap = MetricsSnapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS_METRIC and sample.labels.get("endpoint", "").startswith("/v1/"):
                code = int(sample.labels.get("code", "0"))
                snap.requests += sample.value
                if code >= 500:
                    snap.server_errors += sample.value
                elif code >= 400:
                    snap.client_errors += sample.value
            elif sample.name == MODEL_INFO_METRIC and sample.value == 1:
                snap.model_version = sample.labels.get("model_version")
            elif sample.name == RESIDENT_MEMORY_METRIC:
                snap.resident_memory_bytes = sample.value
    return snap


def error_rates(prev: MetricsSnapshot | None, now: MetricsSnapshot) -> tuple[float, float, float]:
    """(requests, 5xx rate, 4xx rate) since `prev` (since server start when there is none or it restarted)."""
    base = prev if prev is not None and now.requests >= prev.requests else MetricsSnapshot()
    n = now.requests - base.requests
    if n <= 0:
        return 0.0, 0.0, 0.0
    return n, (now.server_errors - base.server_errors) / n, (now.client_errors - base.client_errors) / n


def check_prediction(body) -> str | None:
    """None when a predict response is well formed, else what is wrong with it."""
    if not isinstance(body, dict):
        return "response is not a JSON object"
    probs = body.get("probabilities")
    if body.get("button") not in BUTTONS:
        return f"button {body.get('button')!r} is not one of the 8 buttons"
    if not isinstance(probs, dict) or sorted(probs) != sorted(BUTTONS):
        return "probabilities do not cover the 8 buttons"
    total = sum(probs.values())
    if not math.isclose(total, 1.0, abs_tol=1e-3):
        return f"probabilities sum to {total:.4f}, not 1"
    return None


@dataclass
class HealthMonitor:
    server_url: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    probe_frames: list[str] | None = None  # 4 base64 PNG/JPEG; synthetic frames when None
    api_key: str | None = None
    timeout_s: float = 30.0
    alert_webhook: str | None = None
    checks: int = 0
    last_status: str | None = None
    _prev: MetricsSnapshot | None = None

    def __post_init__(self):
        self.server_url = self.server_url.rstrip("/")
        self.probe_frames = self.probe_frames or synthetic_stream(4)
        self.client = httpx.Client(base_url=self.server_url, timeout=self.timeout_s, headers=auth_headers(self.api_key))

    def close(self) -> None:
        self.client.close()

    def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> bool:
        """Poll /ready until it answers 200 or `timeout_s` passes (a server that is still loading)."""
        deadline = time.monotonic() + timeout_s
        while True:
            response, _, err = self._call("GET", "/ready")
            if err is None and response.status_code == 200:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def _call(self, method: str, path: str, **kwargs) -> tuple[httpx.Response | None, float, str | None]:
        start = time.perf_counter()
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            return None, (time.perf_counter() - start) * 1000, f"{type(exc).__name__}: {exc}".strip(": ")
        return response, (time.perf_counter() - start) * 1000, None

    def check(self) -> dict:
        """One check; returns the JSON-line row."""
        self.checks += 1
        row: dict = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "check": self.checks,
            "server_url": self.server_url,
        }
        reasons: list[str] = []

        response, ms, err = self._call("GET", "/health")
        row["health"] = {"ok": err is None and response.status_code == 200, "latency_ms": round(ms, 1)}
        if err is not None:
            reasons.append(f"down: /health unreachable ({err})")
        elif response.status_code != 200:
            reasons.append(f"down: /health answered {response.status_code}")
        if reasons:  # nothing else can answer either
            return self._finish(row, reasons)

        response, ms, err = self._call("GET", "/ready")
        ready = err is None and response.status_code == 200
        row["ready"] = {"ok": ready, "latency_ms": round(ms, 1)}
        if not ready:
            reasons.append(f"not ready: /ready {err or response.status_code}")

        response, ms, err = self._call("GET", "/metrics")
        if err is None and response.status_code == 200:
            snap = parse_metrics(response.text)
            n, rate5, rate4 = error_rates(self._prev, snap)
            self._prev = snap
            row["metrics"] = {
                "requests": n,
                "error_rate": round(rate5, 4),
                "client_error_rate": round(rate4, 4),
                "model_version": snap.model_version,
                "resident_memory_mb": None
                if snap.resident_memory_bytes is None
                else round(snap.resident_memory_bytes / 2**20, 1),
            }
            if rate5 > self.thresholds.error_rate:
                reasons.append(
                    f"erroring: {rate5:.1%} of {n:.0f} requests got 5xx (> {self.thresholds.error_rate:.1%})"
                )
        else:
            reasons.append(
                f"metrics: /metrics {err or response.status_code}"
                + (" (pass --api_key_env)" if response is not None and response.status_code == 401 else "")
            )

        if ready:
            response, ms, err = self._call("POST", "/v1/predict", json=predict_payload(self.probe_frames))
            problem = err or (
                f"HTTP {response.status_code}" if response.status_code != 200 else check_prediction(_json(response))
            )
            row["predict"] = {
                "ok": problem is None,
                "latency_ms": round(ms, 1),
                "button": _json(response).get("button") if problem is None else None,
            }
            if problem is not None:
                reasons.append(f"predict probe failed: {problem}")
            elif ms > self.thresholds.latency_ms:
                reasons.append(f"slow: predict took {ms:.0f} ms (> {self.thresholds.latency_ms:.0f} ms)")
        return self._finish(row, reasons)

    def _finish(self, row: dict, reasons: list[str]) -> dict:
        row["status"] = UNHEALTHY if reasons else HEALTHY
        row["reasons"] = reasons
        changed = row["status"] != self.last_status
        self.last_status = row["status"]
        if self.alert_webhook and changed and (row["status"] == UNHEALTHY or row["check"] > 1):
            row["alert"] = self._alert(row)
        return row

    def _alert(self, row: dict) -> str:
        """POST the row to the webhook; returns 'sent' or why not (never raises)."""
        try:
            response = httpx.post(self.alert_webhook, json={"text": status_line(row), **row}, timeout=10)
            return "sent" if response.status_code < 400 else f"webhook answered {response.status_code}"
        except httpx.HTTPError as exc:
            return f"webhook failed ({type(exc).__name__})"


def _json(response: httpx.Response | None) -> dict:
    try:
        body = response.json()
    except (ValueError, AttributeError):
        return {}
    return body if isinstance(body, dict) else {}


def status_line(row: dict) -> str:
    parts = [row["time"][11:19], f"#{row['check']}", row["status"].upper()]
    if "predict" in row:
        parts.append(f"predict {row['predict']['latency_ms']:.0f} ms")
    if "metrics" in row:
        parts.append(f"5xx {row['metrics']['error_rate']:.1%}")
        parts.append(f"model {row['metrics']['model_version']}")
    if row["reasons"]:
        parts.append("; ".join(row["reasons"]))
    return "  ".join(parts)


def run_monitor(
    monitor: HealthMonitor,
    *,
    interval_s: float = 10.0,
    max_checks: int | None = None,
    output: str | Path | None = None,
    wait_ready_s: float = 0.0,
    stream=sys.stdout,
) -> int:
    """Check every `interval_s` until `max_checks` (forever if None); 0 if the last check was healthy, else 1.
    `wait_ready_s` > 0 first waits that long for /ready (the checks then run whatever the outcome)."""
    if wait_ready_s > 0 and not monitor.wait_ready(wait_ready_s):
        print(f"server not ready after {wait_ready_s:.0f} s", file=stream, flush=True)
    out = None
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        out = open(output, "a", encoding="utf-8")  # one complete line per write: a status log, appended
    try:
        while max_checks is None or monitor.checks < max_checks:
            row = monitor.check()
            if out is not None:
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(status_line(row), file=stream, flush=True)
            if max_checks is None or monitor.checks < max_checks:
                time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    finally:
        if out is not None:
            out.close()
        monitor.close()
    return 0 if monitor.last_status == HEALTHY else 1
