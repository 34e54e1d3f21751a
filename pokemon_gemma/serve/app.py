"""The FastAPI app: /v1/predict, /v1/chat/completions, /health, /ready, /metrics.

The event loop only reads bodies and waits: JSON parsing and frame decoding run on a small pool of
decoding threads (bounded, so decoded pixels in flight are bounded too), model calls on one worker
thread (see worker.py). Every client mistake is a 4xx with OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`; invalid requests get 400, as OpenAI answers them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..backends import Backend
from ..backends.frame_cache import FrameCache
from ..dataset import BUTTONS, QUESTION, make_output
from ..scoring import ButtonScores, parse_generated
from .metrics import CLIENT_CLOSED, ServerMetrics
from .validation import (
    MAX_FRAME_PIXELS,
    MAX_REQUEST_PIXELS,
    Frame,
    FrameLimits,
    InferenceRequest,
    RequestError,
    invalid,
    parse_chat,
    parse_json,
    parse_predict,
)
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
    max_queue: int = 64  # model requests decoding, waiting or running; more get 503 (bounded memory)
    shutdown_grace_s: float = 30.0  # drain(): how long queued work may still run once shutdown begins
    request_timeout_s: float = 600.0  # a model call that takes longer answers 504
    max_frame_pixels: int = MAX_FRAME_PIXELS  # declared pixels of one frame; more: 413 from the header
    max_request_pixels: int = MAX_REQUEST_PIXELS  # the 4 frames together
    decode_workers: int = 2  # threads parsing and decoding requests (each holds one decoded frame at a time)
    warmup: bool = True


# OpenAI's error `type` and a default `code` per status.
_ERRORS = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    CLIENT_CLOSED: ("invalid_request_error", "client_closed_request"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "server_busy"),
    504: ("server_error", "timeout"),
}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    kind, default_code = _ERRORS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}
    return JSONResponse(body, status, headers=headers)


def _headers_for(status: int) -> dict | None:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": "1"} if status == 503 else None


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


class _CatchAll:
    """The last line for a bug: an unexpected exception is a 500 with the error object and one log line,
    and is not re-raised, so uvicorn keeps the connection (a re-raised error makes it close it, and the
    client's next request on that connection fails)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("internal error on %s: %s: %s", scope.get("path"), type(exc).__name__, str(exc)[:300])
            if not started:
                response = error_response(500, f"internal error ({type(exc).__name__})")
                await response(scope, receive, send)


class _Authenticate:
    """With an API key: /v1/* and /metrics need `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in PROTECTED:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            problem = None
            if scheme.lower() != "bearer" or not token:
                problem = "missing API key (send Authorization: Bearer <key>)"
            elif not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                problem = "invalid API key"
            if problem:
                return await error_response(401, problem, headers=_headers_for(401))(scope, receive, send)
        return await self.app(scope, receive, send)


def _button_logprobs(logprobs: dict[str, float]) -> dict[str, float]:
    """Log-probabilities over the 8 answers (the log of `ButtonScores.probabilities`)."""
    top = max(logprobs.values())
    norm = top + math.log(sum(math.exp(v - top) for v in logprobs.values()))
    return {b: logprobs[b] - norm for b in BUTTONS}


def _logprob_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def create_app(backend: Backend, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = ServerMetrics(backend.name, backend.model_version)
    cache = FrameCache(config.frame_cache_size if backend.supports_features else 0)
    worker = InferenceWorker(backend, metrics, cache, config.max_batch, config.batch_wait_ms / 1000)
    state = {"ready": False, "pending": 0, "draining": False}
    frame_input = backend.frame_input() if hasattr(backend, "frame_input") else None
    limits = FrameLimits(
        max_frame_pixels=config.max_frame_pixels,
        max_request_pixels=config.max_request_pixels,
        target_size=frame_input[0] if frame_input else None,
        resample=frame_input[1] if frame_input else Image.Resampling.BILINEAR,
    )
    # Our own pixel limits are far below PIL's: its warning about large images is noise here.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    decoder = ThreadPoolExecutor(max(1, config.decode_workers), thread_name_prefix="decode")

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
        cancelled = worker.cancel_all(
            RequestError(503, "server shutting down: request not run (retry elsewhere)", code="shutting_down")
        )
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
        decoder.shutdown(wait=not state["draining"])
        log.info("model worker stopped" if stopped else "model worker still busy with a cancelled batch; exiting")

    app = FastAPI(
        title="pokemon-gemma inference server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.metrics, app.state.cache, app.state.backend = metrics, cache, backend
    app.state.drain, app.state.worker = drain, worker

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.param, exc.code, _headers_for(exc.status))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise invalid("invalid Content-Length header")
            if int(declared) > config.max_body_bytes:
                raise RequestError(413, f"body of {int(declared)} bytes exceeds the {config.max_body_bytes}-byte limit")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_body_bytes:
                    raise RequestError(413, f"body exceeds the {config.max_body_bytes}-byte limit")
        except ClientDisconnect:
            # The client hung up mid-upload: its mistake (or its network's), not a server error.
            raise RequestError(CLIENT_CLOSED, "the client closed the connection before the body arrived") from None
        return bytes(body)

    async def run_model(request: Request, parse) -> tuple[InferenceRequest, Result]:
        """Read the body, take a queue slot, parse and decode on a decoding thread, run the model."""
        if state["draining"]:  # before the body is read: refused at once
            raise RequestError(503, "server shutting down (retry elsewhere)", code="shutting_down")
        body = await read_body(request)
        if not state["ready"]:
            raise RequestError(503, "model is not ready yet (poll /ready)", code="model_not_ready")
        if state["pending"] >= config.max_queue:
            raise RequestError(503, f"server busy: {state['pending']} requests queued (retry shortly)")
        state["pending"] += 1  # held while decoding too: decoded frames in memory stay bounded by the queue
        metrics.queue.set(state["pending"])
        try:
            loop = asyncio.get_running_loop()
            req = await loop.run_in_executor(decoder, lambda: parse(parse_json(body), limits))
            # shield: a timed-out request's job still runs to completion on the worker
            result = await asyncio.wait_for(asyncio.shield(worker.submit(req)), config.request_timeout_s)
        except TimeoutError:
            raise RequestError(504, f"model call took longer than {config.request_timeout_s:.0f} s") from None
        finally:
            state["pending"] -= 1
            metrics.queue.set(state["pending"])
        metrics.count_tokens(result.prompt_tokens, result.completion_tokens)
        return req, result

    @app.post("/v1/predict")
    async def predict(request: Request):
        start = time.perf_counter()
        req, result = await run_model(request, parse_predict)
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
        req, result = await run_model(request, parse_chat)
        extra: dict = {}
        logprobs = None
        if result.mode == "score":
            probs = ButtonScores(result.logprobs).probabilities
            button = max(probs, key=probs.get)
            content = make_output(button)
            extra = {"button": button, "probabilities": probs}
            if req.logprobs:
                lps = _button_logprobs(result.logprobs)
                ranked = sorted(BUTTONS, key=lambda b: -lps[b])[: 8 if req.top_logprobs is None else req.top_logprobs]
                top = [_logprob_entry(b, lps[b]) for b in ranked]
                logprobs = {"content": [{**_logprob_entry(button, lps[button]), "top_logprobs": top}], "refusal": None}
        else:
            content = result.text
            parsed, _ = parse_generated(content)
            extra = {"button": parsed["button"] if parsed else None}
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": backend.model_version,
            "system_fingerprint": None,
        }
        if req.stream:
            return StreamingResponse(
                _chunks(head, content, logprobs, result.finish_reason, usage if req.stream_usage else None),
                media_type="text/event-stream",
            )
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage,
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

    # Outermost last: metrics see every response, auth runs before any route, the catch-all is innermost.
    app.add_middleware(_CatchAll)
    if config.api_key:
        app.add_middleware(_Authenticate, api_key=config.api_key)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


def _chunks(head: dict, content: str, logprobs: dict | None, finish_reason: str, usage: dict | None):
    """The answer as OpenAI's server-sent events: role, content, finish reason, (with
    stream_options.include_usage) the usage, then [DONE]. The model call is already complete, so the
    content comes in one chunk."""

    def event(choices: list, **more) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": choices, **more}
        if usage is not None:
            body.setdefault("usage", None)  # OpenAI: null on every chunk but the last
        return "data: " + json.dumps(body) + "\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
    yield event([{"index": 0, "delta": {"content": content}, "logprobs": logprobs, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


__all__ = ["ServerConfig", "create_app", "error_response"]
