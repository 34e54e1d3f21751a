"""The FastAPI app: /v1/predict, /v1/chat/completions, /health, /ready, /metrics.

Model calls run on one worker thread (see worker.py); the event loop only parses, validates and
waits. Every client mistake is a 4xx with a one-line reason in `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backends import Backend
from ..backends.frame_cache import FrameCache
from ..dataset import QUESTION, make_output
from ..scoring import ButtonScores, parse_generated
from .metrics import ServerMetrics
from .validation import Frame, InferenceRequest, RequestError, parse_chat, parse_json, parse_predict
from .worker import InferenceWorker, Result

log = logging.getLogger(__name__)

PROTECTED = ("/v1/predict", "/v1/chat/completions", "/v1/models", "/metrics")
ENDPOINTS = ("/v1/predict", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics")


@dataclass
class ServerConfig:
    api_key: str | None = None  # None: no auth
    max_body_bytes: int = 8 * 1024 * 1024
    frame_cache_size: int = 128
    max_batch: int = 8
    batch_wait_ms: float = 2.0
    max_queue: int = 64  # model requests waiting or running; more get 503 (back-pressure, bounded memory)
    shutdown_grace_s: float = 30.0  # drain(): how long queued work may still run once shutdown begins
    request_timeout_s: float = 600.0  # a model call that takes longer answers 504
    warmup: bool = True


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class _MetricsMiddleware:
    """Counts every HTTP response by endpoint and status; unknown paths share one label."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        state = {"code": 500, "recorded": False}

        def record():
            if not state["recorded"]:
                state["recorded"] = True
                self.metrics.observe(endpoint, state["code"], time.perf_counter() - start)

        async def capture(message):
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the client can see the response, so its next /metrics includes it
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.inflight.dec()
            record()


def create_app(backend: Backend, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = ServerMetrics(backend.name, backend.model_version)
    cache = FrameCache(config.frame_cache_size if backend.supports_features else 0)
    worker = InferenceWorker(backend, metrics, cache, config.max_batch, config.batch_wait_ms / 1000)
    state = {"ready": False, "pending": 0, "draining": False}

    async def warm_up():
        blank = Image.new("RGB", (64, 64))
        request = InferenceRequest([Frame(blank, "warmup")] * 4, "", QUESTION, "score", None, 1)
        try:
            await worker.submit(request)
        except Exception:
            if not state["draining"]:
                log.exception("warm-up failed; /ready stays 503")
            return
        if state["draining"]:
            return
        state["ready"] = True
        metrics.ready.set(1)
        log.info("model %s ready (%s backend)", backend.model_version, backend.name)

    async def drain(grace_s: float | None = None) -> None:
        """Begin a graceful shutdown: from now on new model requests get 503 (and /ready 503); queued
        and running requests have `grace_s` to finish; whatever is left then is answered 503. Returns
        once every model request has its answer, so the server can close its connections and exit."""
        grace_s = config.shutdown_grace_s if grace_s is None else grace_s
        state["draining"], state["ready"] = True, False
        metrics.ready.set(0)
        log.info("shutting down: new requests get 503; %d queued or running, %.0f s left", state["pending"], grace_s)
        deadline = time.monotonic() + grace_s
        while state["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cancelled = worker.cancel_all(RequestError(503, "server shutting down: request not run (retry elsewhere)"))
        if cancelled:
            log.warning("shutting down: %d requests not run within %.0f s were answered 503", cancelled, grace_s)
        end = time.monotonic() + 2.0
        while state["pending"] and time.monotonic() < end:  # the cancelled requests' 503s go out
            await asyncio.sleep(0.01)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        task = asyncio.create_task(warm_up()) if config.warmup else None
        if task is None:
            state["ready"] = True
            metrics.ready.set(1)
        yield
        # Whatever is still queued runs now (after drain() nothing is); a batch still on the model
        # after a drain is not waited for long: its requests have had their answer.
        if task is not None:
            await task
        stopped = await asyncio.to_thread(worker.stop, 0.5 if state["draining"] else 60.0)
        log.info("model worker stopped" if stopped else "model worker still busy with a cancelled batch; exiting")

    app = FastAPI(
        title="pokemon-gemma inference server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.metrics, app.state.cache, app.state.backend = metrics, cache, backend
    app.state.drain, app.state.worker = drain, worker

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        headers = (
            {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {"Retry-After": "1"} if exc.status == 503 else None
        )
        return error_response(exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return error_response(500, f"internal error ({type(exc).__name__})")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path in PROTECTED:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return error_response(
                    401, "missing API key (send Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
                )
            if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
                return error_response(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "invalid Content-Length header")
            if int(declared) > config.max_body_bytes:
                raise RequestError(413, f"body of {int(declared)} bytes exceeds the {config.max_body_bytes}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise RequestError(413, f"body exceeds the {config.max_body_bytes}-byte limit")
        return parse_json(bytes(body))

    async def infer(req: InferenceRequest) -> Result:
        if state["draining"]:
            raise RequestError(503, "server shutting down (retry elsewhere)")
        if not state["ready"]:
            raise RequestError(503, "model is not ready yet (poll /ready)")
        if state["pending"] >= config.max_queue:
            raise RequestError(503, f"server busy: {state['pending']} requests queued (retry shortly)")
        state["pending"] += 1
        metrics.queue.set(state["pending"])
        try:
            # shield: a timed-out request's job still runs to completion on the worker
            return await asyncio.wait_for(asyncio.shield(worker.submit(req)), config.request_timeout_s)
        except TimeoutError:
            raise RequestError(504, f"model call took longer than {config.request_timeout_s:.0f} s") from None
        finally:
            state["pending"] -= 1
            metrics.queue.set(state["pending"])

    @app.post("/v1/predict")
    async def predict(request: Request):
        start = time.perf_counter()
        req = parse_predict(await read_json(request))
        result = await infer(req)
        body = {
            "button": None,
            "probabilities": None,
            "output": None,
            "mode": req.mode,
            "model_version": backend.model_version,
            "session_id": req.session_id,
            "cache": {"hits": result.cache_hits, "frames_encoded": result.frames_encoded},
        }
        if result.mode == "score":
            probs = ButtonScores(result.logprobs).probabilities
            button = max(probs, key=probs.get)
            body.update(button=button, probabilities=probs, output={"button": button})
        else:
            parsed, problem = parse_generated(result.text)
            body.update(
                raw=result.text, parse_error=problem, output=parsed, button=parsed["button"] if parsed else None
            )
        body["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        start = time.perf_counter()
        req = parse_chat(await read_json(request))
        result = await infer(req)
        extra = {}
        if result.mode == "score":
            probs = ButtonScores(result.logprobs).probabilities
            button = max(probs, key=probs.get)
            content = make_output(button)
            extra = {"button": button, "probabilities": probs}
        else:
            content = result.text
            parsed, _ = parse_generated(content)
            extra = {"button": parsed["button"] if parsed else None}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": backend.model_version,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            **extra,
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": backend.model_version, "object": "model", "created": 0, "owned_by": "pokemon-gemma"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        body = {"ready": state["ready"], "model_version": backend.model_version, "backend": backend.name}
        if state["draining"]:
            body["shutting_down"] = True
        return JSONResponse(body, 200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


__all__ = ["ServerConfig", "create_app", "error_response"]
