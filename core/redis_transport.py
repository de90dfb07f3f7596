"""kombu's Redis transport with one fix: a channel remembers how it reached Redis.

When Redis restarts, Celery collects the lost connection, which detaches it from its
transport (``client = None``), then closes the task consumer's channel. Closing hands the
channel's unacknowledged messages back to their queues, which needs a new connection pool,
and stock kombu (5.7) builds it from the detached client: ``AttributeError``, and the
worker exits (about one Redis-restart chaos run in twelve). This channel builds it from the
parameters it last used, so the messages go back at once instead.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis


class Channel(redis.Channel):
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
