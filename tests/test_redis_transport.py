"""``core.redis_transport`` on real redis-servers: a channel closed after Celery collected
its lost connection hands its unacknowledged messages back instead of raising; deliveries
of deferred tasks wait for their worker to record them, and go back to their queue if
handed back first; a ``rediss://`` broker verifies the server's certificate."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import redis
from kombu.exceptions import OperationalError

from core import redis_transport
from tests.cluster import Service, free_port, redis_server_binary, wait_until

QUEUE = kombu.Queue("transport-test", routing_key="transport-test")


def receive_unacked(connection: kombu.Connection) -> kombu.transport.virtual.Channel:
    """Publish one message and receive it without acknowledging it; the channel."""
    return receive(connection)[0]


def receive(
    connection: kombu.Connection, task: str | None = None
) -> tuple[kombu.transport.virtual.Channel, kombu.Message]:
    """Publish one message (of ``task``, as Celery names it in the headers) and receive it
    without acknowledging it."""
    with connection.Producer() as producer:
        producer.publish(
            {"job": 1},
            routing_key=QUEUE.routing_key,
            declare=[QUEUE],
            headers={"task": task} if task else {},
        )
    channel = connection.channel()
    received: list[kombu.Message] = []
    consumer = kombu.Consumer(channel, [QUEUE], callbacks=[lambda _, m: received.append(m)])
    consumer.consume()
    connection.drain_events(timeout=5)
    assert len(received) == 1
    return channel, received[0]


def lose_connection(channel: kombu.transport.virtual.Channel) -> None:
    """What a Redis restart leaves behind once Celery collected the connection: pools
    dropped, the transport detached from its ``Connection``."""
    channel._disconnect_pools()
    channel.connection.client = None


def test_closing_after_the_connection_was_collected_requeues_unacked(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    channel = receive_unacked(kombu.Connection(redis_url, **transport(redis_url)))
    assert client.llen(QUEUE.name) == 0
    lose_connection(channel)
    channel.close()
    assert client.llen(QUEUE.name) == 1  # back in its queue, ready for another worker
    assert client.hlen("unacked") == 0
    client.delete(QUEUE.name)


def test_stock_kombu_still_needs_this_fix(redis_url: str) -> None:
    # When this fails, kombu fixed the bug upstream and core.redis_transport can go.
    channel = receive_unacked(kombu.Connection(redis_url))
    lose_connection(channel)
    with pytest.raises(AttributeError, match="hostname"):
        channel.close()
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture
def deferring() -> Iterator[str]:
    """Deliveries of task "deferred.task" are left to their worker to record."""
    redis_transport.deferred.tasks = frozenset({"deferred.task"})
    yield "deferred.task"
    redis_transport.deferred.tasks = frozenset()


def test_deferred_delivery_waits_for_its_worker_to_record_it(
    redis_url: str, deferring: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    connection = kombu.Connection(redis_url, **transport(redis_url))
    channel, message = receive(connection, deferring)
    assert client.hlen("unacked") == 0  # no round trip before the consumer saw it
    entry = redis_transport.deferred.take(message.delivery_tag)
    assert entry is not None
    payload, _exchange, routing_key = json.loads(entry)  # what kombu itself would write
    assert payload["properties"]["delivery_tag"] == message.delivery_tag
    assert routing_key == QUEUE.routing_key
    assert redis_transport.deferred.take(message.delivery_tag) is None  # taken once
    channel.basic_ack(message.delivery_tag)
    connection.close()


def test_other_deliveries_are_recorded_by_kombu(redis_url: str, deferring: str) -> None:
    client = redis.Redis.from_url(redis_url)
    connection = kombu.Connection(redis_url, **transport(redis_url))
    channel, message = receive(connection, "some.other.task")
    assert client.hexists("unacked", message.delivery_tag)
    assert redis_transport.deferred.take(message.delivery_tag) is None
    channel.basic_ack(message.delivery_tag)
    assert client.hlen("unacked") == 0
    connection.close()


@pytest.mark.parametrize("hand_back", ["reject_requeue", "close_channel"])
def test_deferred_delivery_handed_back_unrecorded_returns_to_its_queue(
    redis_url: str, deferring: str, hand_back: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    connection = kombu.Connection(redis_url, **transport(redis_url))
    channel, message = receive(connection, deferring)
    assert client.llen(QUEUE.name) == 0
    if hand_back == "reject_requeue":
        channel.basic_reject(message.delivery_tag, requeue=True)
    else:
        channel.close()
    assert client.llen(QUEUE.name) == 1  # back, for another worker
    restored = json.loads(client.lpop(QUEUE.name))
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    assert redis_transport.deferred.take(message.delivery_tag) is None
    connection.close()


def test_deferred_delivery_acked_or_rejected_is_forgotten(redis_url: str, deferring: str) -> None:
    client = redis.Redis.from_url(redis_url)
    connection = kombu.Connection(redis_url, **transport(redis_url))
    channel, message = receive(connection, deferring)
    channel.basic_reject(message.delivery_tag, requeue=False)
    assert redis_transport.deferred.take(message.delivery_tag) is None
    assert client.llen(QUEUE.name) == 0 and client.hlen("unacked") == 0
    connection.close()


def transport(url: str) -> dict[str, object]:
    """The Connection arguments the Celery app uses for ``url``."""
    options = redis_transport.celery_options(url)
    assert options["broker_transport"] == "core.redis_transport:Transport"
    return {"transport": options["broker_transport"], "ssl": options.get("broker_use_ssl")}


def test_other_schemes_keep_kombus_transport() -> None:
    assert redis_transport.celery_options("sentinel://h:26379") == {}


def test_rediss_verifies_the_servers_certificate(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    port = free_port()
    server = Service(
        "redis-tls",
        [
            redis_server_binary(), "--port", "0", "--tls-port", str(port),
            "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path),
        ],
        {},
        tmp_path,
    ).start()  # fmt: skip
    url = f"rediss://localhost:{port}/0"
    try:
        trusted = redis.Redis.from_url(url, ssl_ca_certs=str(cert))
        wait_until(trusted.ping, 10, "redis-server with TLS")
        arguments = transport(url)
        assert arguments["ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        with pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
            kombu.Connection(url, **arguments).ensure_connection(max_retries=1)
        arguments["ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(cert)}
        kombu.Connection(url, **arguments).ensure_connection(max_retries=1)
    finally:
        server.stop()
