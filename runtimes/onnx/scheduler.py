"""The engine thread: continuous batching of every job of one worker process.

Jobs are queued by any thread. The engine thread loops: admit queued jobs while rows are
free (their prefill is a forward pass of its own, then their KV joins the batch), drop
cancelled jobs, then run one decode step for every live job together and sample each
job's next token. A job that ends leaves the batch at once and its row is reused.
Callbacks of a job (``on_token``, ``is_cancelled``) run on this thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from core.errors import BackendError
from runtimes.onnx.decoder import GenaiDecoder, OptimumDecoder
from runtimes.onnx.job import Job

log = logging.getLogger(__name__)


class Engine:
    """Owns a decoder and the thread that drives it."""

    def __init__(self, decoder: GenaiDecoder | OptimumDecoder) -> None:
        self.decoder = decoder
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="onnx-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue a job; it joins the running batch at the next step."""
        with self._cv:
            if self._closed:
                raise BackendError("onnx engine is closed")
            self._pending.append(job)
            self._cv.notify()
        return job

    def close(self) -> None:
        """Stop the thread; jobs still queued or running are cancelled."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    @property
    def active(self) -> int:
        return len(self._active)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._active or self._closed):
                    self._cv.wait()
                if self._closed:
                    break
                room = self.decoder.free_slots
                new = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            try:
                self._admit(new)
                self._drop_cancelled()
                if self._active:
                    self._step()
            except Exception as exc:  # a failed forward pass fails the jobs in it, not the thread
                log.exception("onnx engine step failed")
                self._fail_all(BackendError(f"onnx decoding failed: {exc}"))
        for job in [*self._active, *self._pending]:
            job.finish("cancelled")
        self._active.clear()
        self._pending.clear()

    def _admit(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not (j.cancelled() and j.finish("cancelled"))]
        if not jobs:
            return
        try:
            logits = self.decoder.admit([(job, job.prompt_ids) for job in jobs])
        except Exception as exc:
            log.exception("onnx prefill failed")
            for job in jobs:
                job.fail(BackendError(f"onnx prefill failed: {exc}"))
                if job in self.decoder.rows:
                    self.decoder.release(job)
            return
        self._active += jobs
        for job in jobs:
            self._accept(job, job.sampler(logits[job]))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._active if j.cancelled()]:
            job.finish("cancelled")
            self._leave(job)

    def _step(self) -> None:
        logits = self.decoder.step({job: job.last_token for job in self._active})
        for job in list(self._active):
            self._accept(job, job.sampler(logits[job]))

    def _accept(self, job: Job, token: int) -> None:
        try:
            done = job.accept(token)
        except Exception as exc:  # noqa: BLE001 - a failing on_token ends only its own job
            job.fail(exc)
            done = True
        if done:
            self._leave(job)

    def _leave(self, job: Job) -> None:
        self._active.remove(job)
        self.decoder.release(job)

    def _fail_all(self, error: BaseException) -> None:
        for job in list(self._active):
            job.fail(error)
            try:
                self._leave(job)
            except Exception:
                log.exception("could not release a failed job's row")
                if job in self._active:
                    self._active.remove(job)
