"""/metrics: this API process's metrics plus cluster-wide ones read from Redis at scrape.

Read from Redis, so any one API replica reports them for the whole cluster:

- ``reasonq_queue_depth{queue}``: messages waiting in each routed queue (all ten priority
  lists; messages a worker already reserved are not waiting).
- ``reasonq_jobs_finished_total{status,runtime}``: jobs that reached a final status,
  tallied by the job scripts themselves (``core.jobs``), so it also counts jobs no worker
  finished (cancelled while queued, failed as poison) and needs no scrape of the workers.
  Workers export the per-process ``reasonq_jobs_total``; the two are not summed together.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.deps import RedisDep, SettingsDep
from core import keys

router = APIRouter(tags=["metrics"])


class _Snapshot:
    """A collector over values already read from Redis (collectors can't await)."""

    def __init__(self, depths: dict[str, int], finished: dict[str, int]) -> None:
        self.depths, self.finished = depths, finished

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "reasonq_queue_depth", "Messages waiting in a queue.", labels=["queue"]
        )
        for queue, value in self.depths.items():
            depth.add_metric([queue], value)
        yield depth
        finished = CounterMetricFamily(
            "reasonq_jobs_finished",
            "Jobs that reached a final status, cluster-wide (from Redis).",
            labels=["status", "runtime"],
        )
        for field, value in sorted(self.finished.items()):
            status, _, runtime = field.partition(":")
            finished.add_metric([status, runtime], value)
        yield finished


@router.get("/metrics", include_in_schema=False)
async def metrics(redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus text format."""
    lists = {queue: keys.queue_lists(queue) for queue in settings.queues}
    async with redis.pipeline(transaction=False) as pipe:
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        pipe.hgetall(keys.JOBS_FINISHED)
        replies = await pipe.execute()
    lengths = iter(replies[:-1])
    depths = {queue: sum(next(lengths) for _ in names) for queue, names in lists.items()}
    finished = {k.decode(): int(v) for k, v in replies[-1].items()}
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(depths, finished))
    body = generate_latest(REGISTRY) + generate_latest(snapshot)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
