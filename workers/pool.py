"""Celery's thread pool, with a begun job's pool thread joining once the job is under way.

The executor starts a job on its event loop as Celery's consumer receives the message
(``Executor.begin``); the job's pool thread only runs Celery's bookkeeping around it (the
task-started event, waiting for the run, the ack). Woken at once, that thread competed for
the GIL with the loop just as the loop recorded the start and sent the backend request.
Here it is handed to the pool once the request is out (or the job ended without one): the
same work, off the job's path. Flower's start times and runtimes shift by that much.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from celery.concurrency import thread
from celery.concurrency.base import apply_target

from workers.tasks import executor


class TaskPool(thread.TaskPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: set[Callable[[], None]] = set()  # handed over when under way
        self._lock = threading.Lock()

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> thread.ApplyResult:
        # args: (task name, task id, request dict, body, content type, content encoding)
        properties = (args[2].get("properties") or {}) if args else {}
        under_way = executor.under_way(properties.get("delivery_tag"))
        if under_way is None:
            return super().on_apply(target, args, kwargs, callback, accept_callback)
        applied: Future[None] = Future()

        def hand_over() -> None:
            with self._lock:
                if hand_over not in self._waiting:
                    return  # already handed over (on_stop)
                self._waiting.discard(hand_over)
            running = self.executor.submit(
                apply_target, target, args, kwargs, callback, accept_callback
            )
            running.add_done_callback(lambda _: applied.set_result(None))

        with self._lock:
            self._waiting.add(hand_over)
        under_way.add_done_callback(lambda _: hand_over())
        return thread.ApplyResult(applied)

    def terminate_job(self, pid: int | None, signal: int | None = None) -> None:
        """Terminate (Flower, ``revoke(terminate=True)``) cancels the job instead: Celery
        then announces the revoke, whose handler (``workers.tasks``) asks the job to stop.
        Threads cannot be signalled, so the stock pool refuses."""

    def on_stop(self) -> None:
        # A warm shutdown waits for the pool's threads: hand every waiting job over first.
        with self._lock:
            waiting = list(self._waiting)
        for hand_over in waiting:
            hand_over()
        super().on_stop()
