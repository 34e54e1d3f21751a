"""Inference server and health monitor: the real server (uvicorn subprocess, tiny model) on a free
loopback port, real HTTP, nothing mocked."""

import base64
import io
import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from PIL import Image

from pokemon_gemma.dataset import BUTTONS
from pokemon_gemma.monitor import error_rates, parse_metrics
from pokemon_gemma.serve.client import auth_headers, data_url, encode_image, predict_payload, synthetic_stream
from pokemon_gemma.serve.launch import ServerProcess
from tests.conftest import REPO_ROOT

API_KEY = "sk-test-SERVE-0123456789abcdef"
FRAMES = synthetic_stream(8)


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def client(url: str, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, trust_env=False, headers=auth_headers(key))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # cwd is an empty folder: a developer's .env must not change the server under test.
    cwd = tmp_path_factory.mktemp("server")
    with ServerProcess(
        ["--model_path", str(tiny_model_dir), "--max_body_mb", "1", "--max_queue", "4"],
        log_path=cwd / "server.log",
        cwd=cwd,
    ) as srv:
        yield srv


def assert_valid_prediction(body: dict, version_prefix: str = "tiny_gemma3") -> None:
    probs = body["probabilities"]
    assert sorted(probs) == sorted(BUTTONS)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)
    assert body["button"] == max(probs, key=probs.get) and body["output"] == {"button": body["button"]}
    assert body["model_version"].startswith(version_prefix) and body["latency_ms"] > 0


@pytest.mark.slow  # starts the server
def test_predict_score_and_generate(server):
    with client(server.url) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").json()["ready"] is True
        r = c.post("/v1/predict", json=predict_payload(FRAMES[:4], context="Goal: reach the door."))
        assert r.status_code == 200, r.text
        assert_valid_prediction(r.json())
        # JPEG frames and data URLs are accepted too
        jpeg = [
            data_url(encode_image(Image.new("RGB", (160, 144), (i * 50, 10, 10)), "JPEG"), "image/jpeg")
            for i in range(4)
        ]
        assert_valid_prediction(c.post("/v1/predict", json=predict_payload(jpeg)).json())
        r = c.post("/v1/predict", json={**predict_payload(FRAMES[:4], mode="generate"), "max_new_tokens": 8})
        body = r.json()
        assert r.status_code == 200 and body["mode"] == "generate" and isinstance(body["raw"], str)
        # the random tiny model rarely writes valid JSON: then the server says so instead of guessing
        assert (body["parse_error"] is None) == (body["button"] in BUTTONS)


def _png_of_size(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _gif() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return base64.b64encode(buf.getvalue()).decode()


BAD_REQUESTS = [
    # (what, body bytes or JSON object, status, words in the reason); invalid requests get 400 as with OpenAI
    ("empty body", b"", 400, "empty body"),
    ("not JSON", b"{frames:", 400, "not valid JSON"),
    ("JSON array", [FRAMES[0]], 400, "JSON object"),
    ("missing frames", {"context": "x"}, 400, "frames: missing"),
    ("3 frames", {"frames": FRAMES[:3]}, 400, "expected 4 frames"),
    ("5 frames", {"frames": FRAMES[:5]}, 400, "got 5"),
    ("frames not a list", {"frames": "abc"}, 400, "expected a list"),
    ("frame not a string", {"frames": [1, 2, 3, 4]}, 400, "frames[0]: expected a base64"),
    ("not base64", {"frames": ["@@@@"] + FRAMES[:3]}, 400, "frames[0]: not valid base64"),
    (
        "undecodable image",
        {"frames": FRAMES[:3] + [base64.b64encode(b"not an image").decode()]},
        400,
        "frames[3]: undecodable image",
    ),
    ("truncated PNG", {"frames": [FRAMES[0][:200]] + FRAMES[:3]}, 400, "frames[0]: undecodable image"),
    ("GIF", {"frames": [_gif()] + FRAMES[:3]}, 400, "only PNG and JPEG"),
    (
        "huge image",
        {"frames": [_png_of_size(5000, 4000)] + FRAMES[:3]},
        413,
        "too large (max 16777216 pixels per frame)",
    ),
    ("file path", {"frames": ["/etc/passwd"] * 4}, 400, "file paths are not accepted"),
    ("relative path", {"frames": ["frames/0001.png"] * 4}, 400, "file paths"),
    ("file URL", {"frames": ["file:///etc/hosts"] * 4}, 400, "file paths"),
    ("unknown mode", {"frames": FRAMES[:4], "mode": "sample"}, 400, "unknown mode 'sample'"),
    ("context not a string", {"frames": FRAMES[:4], "context": ["a"]}, 400, "context: expected a string"),
    ("session_id not a string", {"frames": FRAMES[:4], "session_id": 7}, 400, "session_id: expected a string"),
    ("bad max_new_tokens", {"frames": FRAMES[:4], "max_new_tokens": 100000}, 400, "max_new_tokens"),
    ("unknown field", {"frames": FRAMES[:4], "frame_paths": ["/x.png"]}, 400, "unknown field 'frame_paths'"),
    ("oversized body", b'{"frames": ["' + b"A" * (1024 * 1024 + 10) + b'"]}', 413, "exceeds the 1048576-byte limit"),
]


@pytest.mark.slow  # starts the server
def test_every_bad_input_gets_its_4xx_and_the_server_keeps_answering(server):
    with client(server.url) as c:
        for what, body, status, words in BAD_REQUESTS:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post("/v1/predict", **kwargs)
            assert r.status_code == status, (what, r.text)
            error = r.json()["error"]
            assert sorted(error) == ["code", "message", "param", "type"], (what, error)  # OpenAI's error object
            assert error["type"] == "invalid_request_error" and isinstance(error["code"], str), (what, error)
            message = error["message"]
            assert words in message and "\n" not in message and "Traceback" not in r.text, (what, message)
            assert c.get("/health").status_code == 200, what
        # chunked upload without Content-Length is cut off at the limit too
        r = c.post("/v1/predict", content=iter([b"x" * 600_000, b"y" * 600_000]))
        assert r.status_code == 413
        assert c.get("/v1/predict").status_code == 405
        assert c.get("/nope").status_code == 404 and "error" in c.get("/nope").json()
        assert c.post("/v1/predict", json=predict_payload(FRAMES[:4])).status_code == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


@pytest.mark.slow  # starts the server
def test_chat_completions_openai_shape(server):
    images = [{"type": "image_url", "image_url": {"url": data_url(f)}} for f in FRAMES[:4]]
    body = {
        "model": "pokemon-gemma",
        "messages": [
            {"role": "system", "content": "Goal: talk to the villager."},
            {"role": "user", "content": [*images, {"type": "text", "text": "Which button next?"}]},
        ],
    }
    with client(server.url) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
        answer = json.loads(out["choices"][0]["message"]["content"])
        assert answer["button"] == out["button"] in BUTTONS
        remote = {
            **body,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}] * 4,
                }
            ],
        }
        r = c.post("/v1/chat/completions", json=remote)
        assert r.status_code == 400 and "only data: URLs" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url"
        r = c.post("/v1/chat/completions", json={**body, "messages": [body["messages"][1] | {"content": images[:2]}]})
        assert r.status_code == 400 and "got 2" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"


@pytest.mark.slow  # starts the server
def test_metrics_counters_move(server):
    with client(server.url) as c:
        before = c.get("/metrics").text
        for _ in range(2):
            assert c.post("/v1/predict", json=predict_payload(FRAMES[1:5])).status_code == 200
        assert c.post("/v1/predict", json={"frames": FRAMES[:2]}).status_code == 400
        after = c.get("/metrics").text
    ok = dict(name="pokemon_gemma_http_requests_total", endpoint="/v1/predict", code="200")
    assert metric(after, **ok) - metric(before, **ok) == 2
    err = dict(name="pokemon_gemma_http_requests_total", endpoint="/v1/predict", code="400")
    assert metric(after, **err) - metric(before, **err) == 1
    lat = dict(name="pokemon_gemma_http_request_duration_seconds_count", endpoint="/v1/predict")
    assert metric(after, **lat) - metric(before, **lat) == 3
    assert (
        metric(after, "pokemon_gemma_predictions_total", mode="score")
        - metric(before, "pokemon_gemma_predictions_total", mode="score")
        == 2
    )
    prompt = metric(after, "pokemon_gemma_tokens_total", type="prompt") - metric(
        before, "pokemon_gemma_tokens_total", type="prompt"
    )
    assert prompt > 2 * 4 * 16  # two answered requests, 4 frames of 16 image tokens each and the text
    assert metric(after, "pokemon_gemma_ready") == 1
    assert metric(after, "pokemon_gemma_model_info", backend="torch") == 1


def test_metric_names_follow_prometheus_conventions(server):
    """One prefix, `_total` counters, base units, no second counter for errors, and the default process
    and platform collectors."""
    from prometheus_client.parser import text_string_to_metric_families

    with client(server.url) as c:
        # one request first: labelled counters have no samples until used (the test must not rely on order)
        assert c.post("/v1/predict", json=predict_payload(FRAMES[0:4])).status_code == 200
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {n: f for n, f in families.items() if not n.startswith(("process_", "python_"))}
    assert ours and all(n.startswith("pokemon_gemma_") for n in ours), sorted(ours)
    assert not any("error" in n for n in ours), sorted(ours)  # errors are the requests counter's code label
    for name, family in ours.items():
        if family.type == "counter":
            assert any(s.name == name + "_total" for s in family.samples), name
        if "latency" in name or "duration" in name:
            assert name.endswith("_seconds"), name
    assert {"pokemon_gemma_http_requests", "pokemon_gemma_http_request_duration_seconds"} <= set(ours)
    assert metric(text, "process_resident_memory_bytes") > 50e6
    assert metric(text, "process_cpu_seconds_total") > 0 and metric(text, "process_open_fds") > 0
    assert "python_info" in families and "python_gc_collections" in families


@pytest.mark.slow  # starts the server
def test_session_stream_reuses_frame_features(server):
    with client(server.url) as c:
        before = c.get("/metrics").text
        stream = [
            c.post("/v1/predict", json=predict_payload(FRAMES[i : i + 4], session_id="run-1")).json() for i in range(5)
        ]
        fresh = [c.post("/v1/predict", json=predict_payload(FRAMES[i : i + 4])).json() for i in range(5)]
        after = c.get("/metrics").text
    assert [r["cache"] for r in stream] == [{"hits": 0, "frames_encoded": 4}] + [{"hits": 3, "frames_encoded": 1}] * 4
    assert all(r["cache"] == {"hits": 0, "frames_encoded": 4} for r in fresh)
    # cached features give the same answer as encoding every frame
    for s, f in zip(stream, fresh):
        assert s["button"] == f["button"]
        assert all(math.isclose(s["probabilities"][b], f["probabilities"][b], abs_tol=1e-5) for b in BUTTONS)
    hits, misses = "pokemon_gemma_frame_cache_hits_total", "pokemon_gemma_frame_cache_misses_total"
    assert metric(after, hits) - metric(before, hits) == 12
    assert metric(after, misses) - metric(before, misses) == 8
    encoded = metric(after, "pokemon_gemma_vision_frames_encoded_total") - metric(
        before, "pokemon_gemma_vision_frames_encoded_total"
    )
    assert encoded == 8 + 20


LONG_CONTEXT = "Goal: talk to the villager by the pond, then walk back to the house. " * 6


@pytest.mark.slow  # starts a second server
def test_concurrent_score_requests_run_as_one_batch_with_one_at_a_time_answers(server, tiny_model_dir, tmp_path):
    """Score requests that arrive together are scored in batched passes (mixed sessions, cache hits
    from earlier requests and from the same batch, misses, no session, contexts of 3 lengths): every
    answer equals the one the module server gives that request alone (1e-5), and /metrics shows the
    batch sizes formed. A request with a malformed prompt (a second <bos> in its context) among them
    gets its own 400, as it does alone; the others are unaffected."""
    cases = [  # (first frame of the window, session, context)
        (1, "run-a", ""),
        (2, "run-a", LONG_CONTEXT),
        (3, "run-a", "Goal: reach the door."),
        (0, "run-b", "Goal: reach the door."),
        (1, "run-b", LONG_CONTEXT),
        (2, None, ""),
        (4, None, LONG_CONTEXT),
        (3, "run-c", ""),
    ]
    payloads = [predict_payload(FRAMES[i : i + 4], context=c, session_id=s) for i, s, c in cases]
    bad = predict_payload(FRAMES[1:5], context="<bos> a second one", session_id="run-b")
    with client(server.url) as c:
        alone = [c.post("/v1/predict", json=p).json() for p in payloads]
        bad_alone = c.post("/v1/predict", json=bad)
    assert bad_alone.status_code == 400 and "<bos>" in bad_alone.json()["error"]["message"]
    srv = ServerProcess(
        ["--model_path", str(tiny_model_dir), "--batch_wait_ms", "1000", "--max_batch", "16"],
        log_path=tmp_path / "server.log",
        cwd=tmp_path,
        ready_timeout_s=600,
    )
    everything = payloads[:4] + [bad] + payloads[4:]
    with srv, client(srv.url) as c, ThreadPoolExecutor(len(everything)) as pool:
        assert c.post("/v1/predict", json=predict_payload(FRAMES[0:4], session_id="run-a")).status_code == 200
        before = c.get("/metrics").text
        futures = [pool.submit(lambda p=p: client(srv.url).post("/v1/predict", json=p)) for p in everything]
        responses = [f.result() for f in futures]
        after = c.get("/metrics").text
    bad_together = responses.pop(4)
    assert bad_together.status_code == 400 and bad_together.json()["error"] == bad_alone.json()["error"]
    assert [r.status_code for r in responses] == [200] * len(payloads)
    together = [r.json() for r in responses]
    for n, (a, t) in enumerate(zip(alone, together)):
        worst = max(abs(a["probabilities"][b] - t["probabilities"][b]) for b in BUTTONS)
        assert worst <= 1e-5, f"request {n} {cases[n]}: batched differs from alone by {worst:.2e}"
        assert t["button"] == a["button"]
        assert t["cache"]["hits"] + t["cache"]["frames_encoded"] == 4
    assert sum(t["cache"]["hits"] for t in together) >= 6  # run-a's frames 1-3 were cached, and more

    def delta(name):
        return metric(after, name) - metric(before, name)

    batches = delta("pokemon_gemma_score_batch_size_requests_count")
    scored = delta("pokemon_gemma_score_batch_size_requests_sum")
    assert scored == len(payloads) and batches < len(payloads), (batches, scored)
    log = srv.log()
    assert "failed on a bad prompt" in log  # the bad request was batched with others, then split off
    assert "Traceback" not in log


@pytest.mark.slow  # starts the server
def test_requests_run_off_the_event_loop_with_a_bounded_queue(server):
    """12 concurrent generations against --max_queue 4: /health answers quickly while they run, the
    queued ones succeed, the rest get 503 + Retry-After instead of piling up."""
    payload = {**predict_payload(FRAMES[:4], mode="generate"), "max_new_tokens": 64}
    with client(server.url) as c, ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(lambda: client(server.url).post("/v1/predict", json=payload)) for _ in range(12)]
        time.sleep(0.3)
        start = time.perf_counter()
        assert c.get("/health").status_code == 200
        health_s = time.perf_counter() - start
        busy = sum(not f.done() for f in futures)
        responses = [f.result() for f in futures]
        assert c.get("/models").status_code == 404 and c.get("/v1/models").json()["data"][0]["id"].startswith("tiny")
    codes = [r.status_code for r in responses]
    assert busy > 0, "the generations finished before /health was probed; the check proved nothing"
    assert health_s < 1.0
    assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert "server busy" in rejected.json()["error"]["message"] and rejected.headers["retry-after"] == "1"


# --------------------------------------------------------------------------- hostile clients and flaky networks


def test_small_requests_declaring_huge_images_keep_memory_bounded_and_health_answering(tiny_model_dir, tmp_path):
    """16 concurrent requests of a few KB whose 4 palette PNGs declare 4096x4096 pixels each are refused
    from the image headers (413, nothing decoded); 16 at the per-request limit (4 x 2048x2048) are decoded
    on the decoding threads and downscaled to the model's input before queueing. Peak resident memory
    stays under 1.5 GB and /health answers within 1 s throughout (bench/bench_serve_hostile.py)."""
    from bench.bench_serve_hostile import hostile_payloads, load_phase

    payloads = hostile_payloads()
    with ServerProcess(["--model_path", str(tiny_model_dir)], log_path=tmp_path / "server.log", cwd=tmp_path) as srv:
        bombs = load_phase(srv.url, srv.proc.pid, payloads["bombs"], clients=16)
        at_limit = load_phase(srv.url, srv.proc.pid, payloads["at_limit"], clients=16)
        with client(srv.url) as c:
            error = c.post("/v1/predict", json=payloads["bombs"]).json()["error"]
    assert bombs["request_bytes"] < 64 * 1024 and bombs["codes"] == {413: 16}, bombs
    assert error["param"] == "frames[1]" and error["code"] == "image_too_large"
    assert "16777216-pixel limit per request" in error["message"]
    assert at_limit["codes"] == {200: 16}, at_limit
    for phase in (bombs, at_limit):
        assert phase["rss_peak_mb"] < 1536, phase
        assert phase["health_max_ms"] < 1000 and phase["health_failures"] == 0 and phase["health_checks"] > 0, phase
    assert bombs["rss_peak_mb"] - bombs["rss_before_mb"] < 50  # refused from the headers: no pixel decoded
    assert "Traceback" not in srv.log()


def test_clients_that_hang_up_mid_upload_are_not_server_errors(server):
    """20 clients send headers and half a body, then close the connection: counted as 499 (client closed
    request), not 500, and the health monitor stays healthy with a 0% 5xx rate."""
    import socket

    from pokemon_gemma.monitor import HealthMonitor

    monitor = HealthMonitor(server.url)
    try:
        monitor.check()  # the baseline: the next check's rates are deltas from here
        with client(server.url) as c:
            before = c.get("/metrics").text
        head = (
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400000\r\n\r\n"
        )
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(head + b'{"frames": ["' + b"A" * 50_000)
        closed = dict(name="pokemon_gemma_http_requests_total", endpoint="/v1/predict", code="499")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server notices each hang-up on its own time
            with client(server.url) as c:
                after = c.get("/metrics").text
            if metric(after, **closed) - metric(before, **closed) >= 20:
                break
            time.sleep(0.2)
        row = monitor.check()
    finally:
        monitor.close()
    assert metric(after, **closed) - metric(before, **closed) == 20
    five = sum(
        metric(after, "pokemon_gemma_http_requests_total", code=str(code))
        - metric(before, "pokemon_gemma_http_requests_total", code=str(code))
        for code in range(500, 600)
    )
    assert five == 0
    assert row["status"] == "healthy" and row["metrics"]["error_rate"] == 0, row
    assert row["metrics"]["client_error_rate"] > 0.9  # the 20 hang-ups (and the first check's probe)
    assert "internal error" not in server.log() and "Traceback" not in server.log()


def _chat_body(**extra) -> dict:
    images = [{"type": "image_url", "image_url": {"url": data_url(f)}} for f in FRAMES[:4]]
    return {"model": "pokemon-gemma", "messages": [{"role": "user", "content": images}], **extra}


def _chat_with_text(role: str, text: str) -> dict:
    body = _chat_body()
    if role == "system":
        body["messages"].insert(0, {"role": "system", "content": text})
    else:
        body["messages"][0]["content"].append({"type": "text", "text": text})
    return body


SURROGATE = "\ud800"
HOSTILE_BODIES = [
    # (what, endpoint, body bytes, param the error names)
    ("surrogate in context", "/v1/predict", {**predict_payload(FRAMES[:4]), "context": SURROGATE}, "context"),
    ("surrogate in question", "/v1/predict", {**predict_payload(FRAMES[:4]), "question": "q" + SURROGATE}, "question"),
    ("surrogate in session_id", "/v1/predict", predict_payload(FRAMES[:4], session_id=SURROGATE), "session_id"),
    (
        "surrogate in chat text",
        "/v1/chat/completions",
        _chat_with_text("user", SURROGATE),
        "messages[0].content[4].text",
    ),
    (
        "surrogate in system text",
        "/v1/chat/completions",
        _chat_with_text("system", SURROGATE),
        "messages[0].content[0].text",
    ),
    ("surrogate in chat session_id", "/v1/chat/completions", _chat_body(user=SURROGATE), "user"),
    ("100k-deep array", "/v1/predict", b"[" * 100_000 + b"]" * 100_000, None),
    ("100k-deep object", "/v1/chat/completions", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, None),
    ("5000-digit integer", "/v1/predict", b'{"frames": [' + b"7" * 5000 + b"]}", None),
]


def test_lone_surrogates_deep_nesting_and_huge_numbers_are_400_and_the_connection_stays_usable(server):
    """Each hostile body is a 400 with OpenAI's error object (not a 500 with a traceback), and the next
    request on the same keep-alive connection is answered."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    good = json.dumps(predict_payload(FRAMES[:4]))
    try:
        conn.connect()
        sock = conn.sock
        for what, path, body, param in HOSTILE_BODIES:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()  # ensure_ascii: "\ud800" escapes
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 400, (what, answer)
            error = answer["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, (what, error)
            assert "\n" not in error["message"], what
            conn.request("POST", "/v1/predict", good, {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["button"] in BUTTONS, what
            assert conn.sock is sock, f"{what}: the server closed the keep-alive connection"
    finally:
        conn.close()
    assert "Traceback" not in server.log() and "internal error" not in server.log()


def test_an_internal_error_is_a_500_that_keeps_the_connection(tmp_path):
    """A bug (an exception no handler expects) is answered 500 with the error object and one log line;
    the connection stays open for the client's next request (a re-raised error made uvicorn close it)."""
    import http.client
    import logging

    import uvicorn
    from fastapi import FastAPI

    from pokemon_gemma.serve.app import _CatchAll
    from pokemon_gemma.serve.launch import free_port

    app = FastAPI()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    app.add_middleware(_CatchAll)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pokemon_gemma.serve.app").addHandler(handler)
    try:
        while not srv.started:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/boom")
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        sock = conn.sock
        conn.request("GET", "/fine")
        after = conn.getresponse()
        assert after.status == 200 and json.loads(after.read()) == {"ok": True} and conn.sock is sock
        conn.close()
    finally:
        logging.getLogger("pokemon_gemma.serve.app").removeHandler(handler)
        srv.should_exit = True
        thread.join(10)
    assert response.status == 500 and error == {
        "message": "internal error (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert [r.getMessage() for r in records] == ["internal error on /boom: RuntimeError: a bug"]


# --------------------------------------------------------------------------- OpenAI and Prometheus conformance


def test_official_openai_client_parses_answers_usage_logprobs_stream_and_errors(server):
    """The official `openai` client (a dev dependency) against the real server: a 4-image request parses
    into its ChatCompletion with real token counts, finish reasons, the 8 buttons' log-probabilities as
    top_logprobs, streaming, and 400 errors with `param` and `code`."""
    openai = pytest.importorskip("openai")
    from openai.types.chat import ChatCompletion

    oc = openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=httpx.Client(trust_env=False)
    )
    images = [{"type": "image_url", "image_url": {"url": data_url(f)}} for f in FRAMES[:4]]
    messages = [
        {"role": "system", "content": "Goal: talk to the villager."},
        {"role": "user", "content": [*images, {"type": "text", "text": "Which button next?"}]},
    ]
    out = oc.chat.completions.create(model="pokemon-gemma", messages=messages, logprobs=True, top_logprobs=8)
    assert isinstance(out, ChatCompletion) and out.object == "chat.completion"
    choice = out.choices[0]
    answer = json.loads(choice.message.content)
    assert choice.finish_reason == "stop" and choice.message.role == "assistant" and answer["button"] in BUTTONS
    usage = out.usage
    assert usage.prompt_tokens > 4 * 16 and usage.completion_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    entry = choice.logprobs.content[0]
    top = entry.top_logprobs
    assert entry.token == answer["button"] == top[0].token and sorted(t.token for t in top) == sorted(BUTTONS)
    assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
    assert math.isclose(sum(math.exp(t.logprob) for t in top), 1.0, abs_tol=1e-6)
    # the same numbers as /v1/predict's probabilities for the same frames, context and question
    same = {**predict_payload(FRAMES[:4], context="Goal: talk to the villager."), "question": "Which button next?"}
    with client(server.url) as c:
        probs = c.post("/v1/predict", json=same).json()["probabilities"]
    assert all(math.isclose(math.exp(t.logprob), probs[t.token], abs_tol=1e-6) for t in top)
    three = oc.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=3)
    assert len(three.choices[0].logprobs.content[0].top_logprobs) == 3

    # generate mode (an extension) with a small max_tokens: the answer is cut, and says so
    gen = oc.chat.completions.create(model="m", messages=messages, max_tokens=3, extra_body={"mode": "generate"})
    assert gen.choices[0].finish_reason == "length" and gen.usage.completion_tokens == 3
    assert gen.usage.prompt_tokens == usage.prompt_tokens

    # streaming: the same answer as server-sent events, usage in the last chunk when asked for
    chunks = list(
        oc.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}, logprobs=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == usage.total_tokens and not chunks[-1].choices
    assert (
        next(c for c in chunks if c.choices and c.choices[0].logprobs).choices[0].logprobs.content[0].token in BUTTONS
    )

    # errors: 400 with OpenAI's fields, 413 for images over the limit
    with pytest.raises(openai.BadRequestError) as bad:
        oc.chat.completions.create(model="m", messages=[{"role": "user", "content": images[:3]}])
    assert bad.value.status_code == 400 and bad.value.param == "messages" and bad.value.code == "invalid_value"
    assert "expected 4 images (oldest first), got 3" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        oc.chat.completions.create(model="m", messages=messages, logprobs=True, extra_body={"mode": "generate"})
    assert bad.value.param == "logprobs" and bad.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as bad:
        oc.chat.completions.create(model="m", messages=messages, top_logprobs=2)
    assert bad.value.param == "top_logprobs"
    big = [{"type": "image_url", "image_url": {"url": data_url(_png_of_size(5000, 4000))}}, *images[1:]]
    with pytest.raises(openai.APIStatusError) as too_big:
        oc.chat.completions.create(model="m", messages=[{"role": "user", "content": big}])
    assert too_big.value.status_code == 413 and too_big.value.code == "image_too_large"
    assert [m.id for m in oc.models.list()] == [out.model]


ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"


def test_alert_rules_parse_and_read_only_metrics_the_server_exports(server):
    """deploy/prometheus/alerts.yml: down, not ready, p95 latency and 5xx ratio, each on a metric the
    live server really exports (always runs; promtool is checked in the next test when installed)."""
    import re

    import yaml
    from prometheus_client.parser import text_string_to_metric_families

    doc = yaml.safe_load(ALERTS.read_text())
    rules = {r["alert"]: r for group in doc["groups"] for r in group["rules"]}
    assert set(rules) == {
        "PokemonGemmaDown",
        "PokemonGemmaNotReady",
        "PokemonGemmaHighLatencyP95",
        "PokemonGemmaHigh5xxRatio",
    }
    for name, rule in rules.items():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    assert (
        "up{" in rules["PokemonGemmaDown"]["expr"]
        and "histogram_quantile(0.95" in rules["PokemonGemmaHighLatencyP95"]["expr"]
    )
    assert 'code=~"5.."' in rules["PokemonGemmaHigh5xxRatio"]["expr"]
    used = set(re.findall(r"\b(pokemon_gemma_[a-z_]+)", " ".join(r["expr"] for r in rules.values())))
    with client(server.url) as c:
        text = c.get("/metrics").text
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert used and used <= exported, used - exported


def test_promtool_checks_and_unit_tests_the_alert_rules():
    """`promtool check rules`, `promtool check config` and `promtool test rules` (each alert fires on the
    series that should trip it and not on a healthy instance). Debian/Ubuntu: apt-get install prometheus."""
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus); alerts.yml is still parsed above")
    folder = ALERTS.parent
    for args in (
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=folder, timeout=120)
        assert done.returncode == 0 and "SUCCESS" in done.stdout, (args, done.stdout + done.stderr)


class _Webhook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        _Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_monitor_cli(url: str, out, *extra, env=None):
    cmd = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "health_monitor.py"),
        "--server_url",
        url,
        "--interval",
        "0.2",
        "--output",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)


@pytest.mark.slow  # starts servers
def test_auth_monitor_graceful_shutdown_then_down(tiny_model_dir, tmp_path):
    import os

    env = {**os.environ, "SERVE_TEST_KEY": API_KEY}
    srv = ServerProcess(
        ["--model_path", str(tiny_model_dir), "--api_key_env", "SERVE_TEST_KEY"],
        log_path=tmp_path / "server.log",
        env=env,
        cwd=tmp_path,
    )
    try:
        # started while the server is still loading: --wait_ready holds the checks until /ready says 200
        out = tmp_path / "status.jsonl"
        probe = tmp_path / "probe"
        probe.mkdir()
        for i in range(4):
            (probe / f"{i:02d}.png").write_bytes(base64.b64decode(FRAMES[i]))
        done = run_monitor_cli(
            srv.url,
            out,
            "--max_checks",
            "2",
            "--api_key_env",
            "SERVE_TEST_KEY",
            "--wait_ready",
            "120",
            "--probe_frames",
            str(probe),
            env=env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["status"] for r in rows] == ["healthy", "healthy"] and "HEALTHY" in done.stdout
        assert all(r["predict"]["ok"] and r["predict"]["button"] in BUTTONS for r in rows)
        assert rows[1]["metrics"] == {**rows[1]["metrics"], "requests": 1, "error_rate": 0}  # the first probe

        payload = predict_payload(FRAMES[:4])
        with client(srv.url) as anon, client(srv.url, "sk-wrong-key") as wrong, client(srv.url, API_KEY) as good:
            r = anon.post("/v1/predict", json=payload)
            assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
            assert r.headers["www-authenticate"] == "Bearer"
            assert wrong.post("/v1/predict", json=payload).status_code == 401
            assert anon.get("/metrics").status_code == 401
            assert anon.get("/health").status_code == 200  # liveness stays open
            assert good.post("/v1/predict", json=payload).status_code == 200
            assert good.get("/metrics").status_code == 200

        # without the key the monitor cannot read /metrics or probe: unhealthy, and it says why
        no_key = run_monitor_cli(srv.url, tmp_path / "nokey.jsonl", "--max_checks", "1", env=env)
        assert no_key.returncode == 1 and "/metrics 401" in no_key.stdout and "HTTP 401" in no_key.stdout
        # an impossible latency threshold makes the same server "slow"
        slow = run_monitor_cli(
            srv.url,
            tmp_path / "slow.jsonl",
            "--max_checks",
            "1",
            "--api_key_env",
            "SERVE_TEST_KEY",
            "--latency_threshold_ms",
            "0.001",
            env=env,
        )
        assert slow.returncode == 1 and "slow: predict took" in slow.stdout

        # SIGTERM while generations are in flight: every one of them still gets its answer
        gen = {**predict_payload(FRAMES[:4], mode="generate"), "max_new_tokens": 64}
        with ThreadPoolExecutor(4) as pool, client(srv.url, API_KEY) as good:
            futures = [pool.submit(lambda: client(srv.url, API_KEY).post("/v1/predict", json=gen)) for _ in range(4)]
            deadline = time.monotonic() + 60  # all 4 received (on a loaded machine 0.5 s may not do)
            while metric(good.get("/metrics").text, "pokemon_gemma_queue_requests") < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            in_flight = sum(not f.done() for f in futures)
            rc = srv.stop()
            codes = [f.result().status_code for f in futures]
        # uvicorn re-raises SIGTERM once it has shut down cleanly
        assert in_flight > 0 and codes == [200] * 4 and rc in (0, -15)
    finally:
        srv.stop()
    log = srv.log()
    assert "Shutting down" in log or "Finished server process" in log
    assert API_KEY not in log and "sk-wrong-key" not in log

    # the server is gone: the monitor must say unhealthy (exit 1) and alert the webhook
    hook = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        down = run_monitor_cli(
            srv.url, out, "--max_checks", "2", "--alert_webhook", f"http://127.0.0.1:{hook.server_port}/alert", env=env
        )
    finally:
        hook.shutdown()
    assert down.returncode == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows[-2:]] == ["unhealthy", "unhealthy"]
    assert rows[-1]["reasons"][0].startswith("down: /health unreachable")
    assert len(_Webhook.received) == 1 and _Webhook.received[0]["status"] == "unhealthy"


@pytest.mark.slow  # starts the server
def test_error_rate_from_metric_deltas(server):
    with client(server.url) as c:
        first = parse_metrics(c.get("/metrics").text)
        c.post("/v1/predict", json=predict_payload(FRAMES[:4]))
        c.post("/v1/predict", content=b"[]")
        second = parse_metrics(c.get("/metrics").text)
    n, rate5, rate4 = error_rates(first, second)
    assert n == 2 and rate5 == 0 and rate4 == 0.5  # only /v1/* requests count
    assert second.model_version.startswith("tiny_gemma3")
    # a restarted server (counters went down) is measured from zero, not as negative rates
    assert error_rates(second, first)[0] == first.requests


@pytest.mark.slow  # server subprocess tries to load a model
def test_server_cli_errors(tmp_path):
    script = str(REPO_ROOT / "scripts" / "inference_server.py")
    r = subprocess.run(
        [sys.executable, script, "--model_path", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: cannot load")
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, script, "--api_key_env", "NO_SUCH_VAR_SET"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "NO_SUCH_VAR_SET is unset or empty" in r.stderr
    mon = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "health_monitor.py"), "--server_url", "127.0.0.1:8000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mon.returncode == 2 and "must start with http://" in mon.stderr
    (tmp_path / "two").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "two" / f"{i}.png")
    mon = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "health_monitor.py"),
            "--server_url",
            "http://127.0.0.1:9",
            "--probe_frames",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert mon.returncode == 2 and mon.stderr.strip() == f"error: {tmp_path / 'two'}: 2 PNG/JPEG files, need 4"


@pytest.mark.slow  # exports and serves
def test_mlx_backend_server(tiny_model_dir, tmp_path):
    """scripts/mlx_inference_server.py with MODEL_PATH from the environment, on an MLX export of the tiny model."""
    import os

    pytest.importorskip("mlx_vlm")
    from pokemon_gemma.export import export_mlx
    from pokemon_gemma.serve.launch import REPO_ROOT as ROOT

    mlx_dir = tmp_path / "mlx"
    export_mlx(tiny_model_dir, mlx_dir, quantization_bits=None, verify=False)
    env = {**os.environ, "MODEL_PATH": str(mlx_dir)}
    with (
        ServerProcess(
            [],
            log_path=tmp_path / "mlx.log",
            env=env,
            cwd=tmp_path,
            script=ROOT / "scripts" / "mlx_inference_server.py",
        ) as srv,
        client(srv.url) as c,
    ):
        assert c.get("/ready").json()["backend"] == "mlx"
        stream = [
            c.post("/v1/predict", json=predict_payload(FRAMES[i : i + 4], session_id="m")).json() for i in range(3)
        ]
        for body in stream:
            assert_valid_prediction(body, version_prefix="mlx-")
        assert [r["cache"]["hits"] for r in stream] == [0, 3, 3]
        fresh = c.post("/v1/predict", json=predict_payload(FRAMES[2:6])).json()
        assert all(
            math.isclose(stream[2]["probabilities"][b], fresh["probabilities"][b], abs_tol=1e-5) for b in BUTTONS
        )
        r = c.post("/v1/predict", json={"frames": FRAMES[:4], "mode": "beam"})
        assert r.status_code == 400 and c.get("/health").status_code == 200
    assert "Traceback" not in srv.log()


@pytest.mark.slow  # starts a server
def test_sigterm_refuses_new_work_then_answers_the_queue_within_the_grace_period(tiny_model_dir, tmp_path):
    """SIGTERM with more queued work than the grace period allows: new requests get 503 at once, the
    queued ones either complete (200) or get a clean 503 (never 500), and the process exits within
    the grace period plus a small margin."""
    import signal

    grace_s = 3.0
    srv = ServerProcess(
        ["--model_path", str(tiny_model_dir), "--shutdown_grace_s", str(grace_s), "--max_batch", "1"],
        log_path=tmp_path / "server.log",
        cwd=tmp_path,
        ready_timeout_s=600,
    )
    gen = {**predict_payload(FRAMES[:4], mode="generate"), "max_new_tokens": 64}
    with srv, client(srv.url) as c:
        start = time.perf_counter()
        assert c.post("/v1/predict", json=gen).status_code == 200
        one_s = time.perf_counter() - start
        n = min(60, int(2 * grace_s / one_s) + 6)  # about twice the work the grace period allows
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(lambda: client(srv.url).post("/v1/predict", json=gen)) for _ in range(n)]
            deadline = time.monotonic() + 60
            while metric(c.get("/metrics").text, "pokemon_gemma_queue_requests") < n and time.monotonic() < deadline:
                time.sleep(0.05)
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            while c.get("/ready").status_code != 503:  # the signal has been handled
                time.sleep(0.02)
            assert c.get("/ready").json()["shutting_down"] is True
            start = time.perf_counter()
            late = c.post("/v1/predict", json=predict_payload(FRAMES[:4]))
            late_s = time.perf_counter() - start
            responses = [f.result() for f in futures]
        rc = srv.proc.wait(timeout=grace_s + 30)
        exit_s = time.monotonic() - signalled
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"] and late_s < 1.0
    assert late.headers["retry-after"] == "1"
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1, codes
    assert all("shutting down" in r.json()["error"]["message"] for r in responses if r.status_code == 503)
    assert rc in (0, -15) and exit_s < grace_s + 3.0, (rc, exit_s)
    log = srv.log()
    assert "Traceback" not in log and "were answered 503" in log
