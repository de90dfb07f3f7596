"""Worker entry point: ``celery -A workers.celery_app worker -Q cpu -E --hostname cpu@%h``.

Adds to the shared Celery app (``core.broker``) what only workers do: a heartbeat in Redis
naming the queues this worker consumes (``/readyz`` reads it) and the metrics server.
"""

from __future__ import annotations

import gc
import json
import threading

import redis
from celery.signals import worker_ready, worker_shutdown

from core import keys
from core.broker import app
from core.settings import settings
from workers import metrics
from workers.tasks import executor

HEARTBEAT_S = 5.0

_stop = threading.Event()


@worker_ready.connect
def _on_ready(sender, **_: object) -> None:
    hostname = sender.hostname
    queues = sorted(sender.app.amqp.queues.consume_from)
    metrics.serve(settings.worker_metrics_port)
    # The loop also sends pending webhooks: start it now, not at the first job; and load
    # the in-process model meanwhile.
    executor.warm_up(queues)
    client = redis.Redis.from_url(settings.redis_url)
    beat = json.dumps({"hostname": hostname, "queues": queues})

    def heartbeat() -> None:
        while not _stop.is_set():
            try:
                client.set(keys.worker(hostname), beat, ex=int(HEARTBEAT_S * 3))
            except redis.RedisError:
                pass  # Redis restarting: the next beat re-registers
            _stop.wait(HEARTBEAT_S)
        client.delete(keys.worker(hostname))

    threading.Thread(target=heartbeat, name="reasonq-heartbeat", daemon=True).start()
    # What start-up loaded lives as long as the worker: keep it out of the collector's
    # full passes, which otherwise stall every job of the process for 50-150 ms.
    gc.freeze()


@worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    _stop.set()


__all__ = ["app"]
