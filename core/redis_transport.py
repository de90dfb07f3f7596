"""kombu's Redis transport with two changes.

**A channel remembers how it reached Redis.** When Redis restarts, Celery collects the lost
connection, which detaches it from its transport (``client = None``), then closes the task
consumer's channel. Closing hands the channel's unacknowledged messages back to their
queues, which needs a new connection pool, and stock kombu (5.7) builds it from the
detached client: ``AttributeError``, and the worker exits (about one Redis-restart chaos run
in twelve). This channel builds it from the parameters it last used, so the messages go
back at once instead.

**A job's delivery is recorded by the script that starts the job.** Stock kombu takes a
message with BRPOP, then records the delivery (its entry in the ``unacked`` hash and index,
what redelivery restores from) in a round trip of its own before the consumer sees the
message. For the tasks listed in ``deferred.tasks`` the worker writes that same entry in
the start script it runs anyway (``core.jobs``), one Redis round trip fewer before a job
starts: about 1 ms of its added latency (docs/performance.md). Until then the entry waits
here; a delivery handed back before it is written (rejected with requeue, or its channel
closed) is restored from here instead of from Redis. A worker killed in between loses the
message as it could between BRPOP and kombu's own write; ``workers.orphans`` finds such jobs
and publishes them again.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis, virtual
from kombu.utils.json import dumps, loads


class DeferredDeliveries:
    """Unacked entries (as kombu writes them) of deliveries whose task is in ``tasks``, kept
    until their worker ``take``s them to write in its start script."""

    def __init__(self) -> None:
        self.tasks: frozenset[str] = frozenset()
        self._entries: dict[str, str] = {}  # delivery tag -> entry; dict ops are atomic

    def keep(self, message: Any, delivery_tag: str) -> bool:
        if (message.headers or {}).get("task") not in self.tasks:
            return False
        info = message.delivery_info
        self._entries[delivery_tag] = dumps([message._raw, info["exchange"], info["routing_key"]])
        return True

    def take(self, delivery_tag: str | None) -> str | None:
        """The entry to record for this delivery, if it is still to be written (once)."""
        return self._entries.pop(delivery_tag, None) if delivery_tag else None


deferred = DeferredDeliveries()


class QoS(redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if deferred.keep(message, delivery_tag):
            virtual.QoS.append(self, message, delivery_tag)  # bookkeeping, no round trip
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        deferred.take(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            deferred.take(delivery_tag)
        super().reject(delivery_tag, requeue)  # a requeue goes through restore_by_tag

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        entry = deferred.take(tag)
        if entry is None:
            super().restore_by_tag(tag, client, leftmost)
            return
        payload, exchange, routing_key = loads(entry)
        with self.channel.conn_or_acquire(client) as conn, conn.pipeline() as pipe:
            self.channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
            pipe.execute()


class Channel(redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._last_connparams: dict[bool, dict[str, Any]] = {}
        super().__init__(*args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is not None:
            self._last_connparams[asynchronous] = super()._connparams(asynchronous)
        return dict(self._last_connparams[asynchronous])


class Transport(redis.Transport):
    Channel = Channel


def celery_options(url: str) -> dict[str, Any]:
    """Celery settings that put this transport under a ``redis://`` or ``rediss://`` broker
    URL; other schemes (Sentinel, sockets) keep kombu's own transport.

    For ``rediss://`` the server's certificate is verified, as redis-py (the API's and the
    workers' own connections) does by default; kombu alone would skip the check.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss"):
        return {}
    options: dict[str, Any] = {"broker_transport": f"{__name__}:Transport"}
    if scheme == "rediss":
        options["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
