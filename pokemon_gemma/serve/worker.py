"""One model thread fed by a queue: model calls never run on the event loop. Requests that arrive
together form a dynamic batch (up to `max_batch`, waiting at most `batch_wait_s` for more): the new
frames of its score requests go through the vision tower in one call (session frames come from the
frame cache), then the score requests run through the language model together (`score_batch`: one
prompt pass and one answer pass); generate requests run one after another."""

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
from ..scoring import ScoreItem
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


@dataclass(eq=False)
class _Job:
    request: InferenceRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    result: Result = field(default=None)  # type: ignore[assignment]
    features: list[Any] | None = None
    cancelled: bool = False


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
        self._lock = threading.Lock()
        self._open: set[_Job] = set()  # submitted and not yet answered
        self._refusal: RequestError | None = None  # set by cancel_all: later submissions get it at once

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish every queued job, then end the thread; False if it is still busy after `timeout`."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def submit(self, request: InferenceRequest) -> Result:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, loop.create_future())
        with self._lock:
            if self._refusal is not None:
                raise self._refusal
            self._open.add(job)
        self._queue.put(job)
        return await job.future

    def cancel_all(self, error: RequestError) -> int:
        """Answer every open job (queued or running) with `error`, and refuse later submissions with it.
        A batch already on the model finishes there, but its answers are dropped. Returns the count."""
        with self._lock:
            self._refusal = error
            jobs, self._open = list(self._open), set()
        for job in jobs:
            job.cancelled = True
            self._finish(job, error)
        return len(jobs)

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
            batch = [j for j in batch if not j.cancelled]
            if batch:
                self._process(batch)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        self.metrics.batch_size.observe(len(batch))
        scoring = [j for j in batch if j.request.mode == "score"]
        try:
            self._encode_batch(scoring)
        except Exception as exc:  # the vision pass failed: fail this batch, keep serving
            log.exception("vision encoding failed")
            for job in batch:
                self._finish(job, exc)
            return
        if scoring:
            self._score(scoring)
        for job in batch:
            if job.request.mode == "score":
                continue
            try:
                self._finish(job, self._generate(job))
            except ValueError as exc:  # e.g. collate.SampleError: prompt too long even without context
                self._finish(job, RequestError(400, str(exc)))
            except Exception as exc:
                log.exception("model call failed")
                self._finish(job, exc)

    def _encode_batch(self, jobs: list[_Job]) -> None:
        """Vision features for every score job: session frames from the cache when there, the rest
        encoded together in one call (frames without a session are encoded every time)."""
        for job in jobs:
            job.result = Result("score")
        if not self.backend.supports_features or not jobs:
            return
        pending: dict[str, Any] = {}  # key -> image, new frames of this batch (deduplicated)
        wants: list[list[str]] = []
        for n, job in enumerate(jobs):
            keys = []
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

    def _score(self, jobs: list[_Job]) -> None:
        """Score the jobs together: each prompt fitted to the context window on its own, then one
        `score_batch`. A prompt that cannot be scored (a ValueError, e.g. special tokens in a context)
        fails the batch before any model pass; the batch is then retried in halves, down to the bad
        request alone, which alone gets its 400 (the others are still scored in batches)."""
        ready: list[tuple[_Job, ScoreItem]] = []
        for job in jobs:
            req = job.request
            try:
                context = self.backend.fit_context(req.context, req.question)
            except ValueError as exc:  # collate.SampleError: too long even without context
                self._finish(job, RequestError(400, str(exc)))
                continue
            ready.append((job, ScoreItem([f.image for f in req.frames], context, req.question, job.features)))
        if ready:
            self._score_items(ready)

    def _score_items(self, ready: list[tuple[_Job, ScoreItem]]) -> None:
        try:
            scores = self.backend.score_batch([item for _, item in ready])
        except ValueError as exc:
            if len(ready) == 1:
                self._finish(ready[0][0], RequestError(400, str(exc)))
                return
            log.info("a score batch of %d failed on a bad prompt (%s); retrying it in halves", len(ready), exc)
            half = len(ready) // 2
            self._score_items(ready[:half])
            self._score_items(ready[half:])
            return
        except Exception as exc:
            log.exception("model call failed")
            for job, _ in ready:
                self._finish(job, exc)
            return
        self.metrics.score_batch_size.observe(len(ready))
        for (job, item), result in zip(ready, scores):
            self.metrics.predictions.labels("score").inc()
            if job.features is None:  # backend without separable vision features: the scorer encoded them
                self.metrics.frames_encoded.inc(len(item.frames))
                job.result.frames_encoded = len(item.frames)
            job.result.logprobs = result.logprobs
            job.result.prompt_tokens = self.backend.prompt_tokens(item.context, item.question)
            job.result.completion_tokens = self.backend.count_tokens(make_output(result.button))  # the answer sent
            self._finish(job, job.result)

    def _generate(self, job: _Job) -> Result:
        req = job.request
        images = [f.image for f in req.frames]
        context = self.backend.fit_context(req.context, req.question)
        self.metrics.predictions.labels(req.mode).inc()
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

    def _finish(self, job: _Job, outcome) -> None:
        with self._lock:
            self._open.discard(job)

        def settle():
            if job.future.done():  # the client went away, or the job was cancelled
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        job.loop.call_soon_threadsafe(settle)


__all__ = ["InferenceWorker", "Result"]
