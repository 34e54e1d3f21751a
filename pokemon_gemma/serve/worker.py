"""One model thread fed by a queue: model calls never run on the event loop, and requests that
arrive together form a small batch whose new frames go through the vision tower in one call."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..backends import Backend
from ..backends.frame_cache import FrameCache
from ..dataset import make_output
from .metrics import ServerMetrics
from .validation import InferenceRequest, RequestError

log = logging.getLogger(__name__)

MAX_VISION_BATCH = 32  # frames per vision-tower call


@dataclass
class Result:
    mode: str
    logprobs: dict[str, float] | None = None
    text: str | None = None
    cache_hits: int = 0
    frames_encoded: int = 0
    prompt_tokens: int = 0  # usage, as the OpenAI API reports it
    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class _Job:
    request: InferenceRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    result: Result = field(default=None)  # type: ignore[assignment]
    features: list[Any] | None = None


class InferenceWorker:
    def __init__(
        self,
        backend: Backend,
        metrics: ServerMetrics,
        cache: FrameCache,
        max_batch: int = 8,
        batch_wait_s: float = 0.002,
    ):
        self.backend = backend
        self.metrics = metrics
        self.cache = cache
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued job, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    async def submit(self, request: InferenceRequest) -> Result:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    # --- worker thread
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        self.metrics.batch_size.observe(len(batch))
        try:
            self._encode_batch([j for j in batch if j.request.mode == "score"])
        except Exception as exc:  # the vision pass failed: fail this batch, keep serving
            log.exception("vision encoding failed")
            for job in batch:
                self._finish(job, exc)
            return
        for job in batch:
            try:
                self._finish(job, self._run_job(job))
            except ValueError as exc:  # e.g. collate.SampleError: prompt too long even without context
                self._finish(job, RequestError(400, str(exc)))
            except Exception as exc:
                log.exception("model call failed")
                self._finish(job, exc)

    def _encode_batch(self, jobs: list[_Job]) -> None:
        """Vision features for every score job: session frames from the cache when there, the rest
        encoded together in one call (frames without a session are encoded every time)."""
        if not self.backend.supports_features or not jobs:
            return
        pending: dict[str, Any] = {}  # key -> image, new frames of this batch (deduplicated)
        wants: list[list[str]] = []
        for n, job in enumerate(jobs):
            keys = []
            job.result = Result("score")
            for i, frame in enumerate(job.request.frames):
                if job.request.session_id is not None and self.cache.enabled:
                    key = frame.digest
                    if self.cache.get(key) is not None or key in pending:
                        job.result.cache_hits += 1
                    else:
                        pending[key] = frame.image
                        job.result.frames_encoded += 1
                else:
                    key = f"job{n}:{i}"
                    pending[key] = frame.image
                    job.result.frames_encoded += 1
                keys.append(key)
            wants.append(keys)
        fresh: dict[str, Any] = {}
        items = list(pending.items())
        for start in range(0, len(items), MAX_VISION_BATCH):
            chunk = items[start : start + MAX_VISION_BATCH]
            for (key, _), features in zip(chunk, self.backend.encode_frames([im for _, im in chunk])):
                fresh[key] = features
        self.metrics.frames_encoded.inc(len(items))
        for job, keys in zip(jobs, wants):
            if job.request.session_id is not None and self.cache.enabled:
                self.metrics.cache_hits.inc(job.result.cache_hits)
                self.metrics.cache_misses.inc(job.result.frames_encoded)
            job.features = [fresh[k] if k in fresh else self.cache.get(k) for k in keys]
        for key, features in fresh.items():
            if not key.startswith("job"):
                self.cache.put(key, features)

    def _run_job(self, job: _Job) -> Result:
        req = job.request
        images = [f.image for f in req.frames]
        context = self.backend.fit_context(req.context, req.question)
        self.metrics.predictions.labels(req.mode).inc()
        if req.mode == "generate":
            self.metrics.frames_encoded.inc(len(images))
            gen = self.backend.generate_details(images, context, req.question, req.max_new_tokens)
            return Result(
                "generate",
                text=gen.text,
                frames_encoded=len(images),
                prompt_tokens=self.backend.prompt_tokens(context, req.question),
                completion_tokens=gen.completion_tokens,
                finish_reason=gen.finish_reason,
            )
        result = job.result or Result("score")
        if job.features is None:  # backend without separable vision features
            self.metrics.frames_encoded.inc(len(images))
            result.frames_encoded = len(images)
        scores = self.backend.score(images, context, req.question, features=job.features)
        result.logprobs = scores.logprobs
        result.prompt_tokens = self.backend.prompt_tokens(context, req.question)
        result.completion_tokens = self.backend.count_tokens(make_output(scores.button))  # the answer sent back
        return result

    @staticmethod
    def _finish(job: _Job, outcome) -> None:
        def settle():
            if job.future.done():  # the client went away
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        job.loop.call_soon_threadsafe(settle)


__all__ = ["InferenceWorker", "Result"]
