"""The webhook sender: every worker process runs one on its executor loop.

It polls the delivery queue (``core.webhooks``) for due deliveries, sends each as a signed
POST on its own task (at most ``REASONQ_WEBHOOK_CONCURRENCY`` at once) and records the
outcome: delivered on a 2xx, else retried with exponential backoff until
``REASONQ_WEBHOOK_MAX_ATTEMPTS``. Sends are plain awaits on the shared loop (DNS in the
loop's resolver threads), so they never hold a job slot nor stall a generation. Each poll
first queues the summaries of batches that ended (whichever process ended them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import redis.asyncio as aioredis

from core.errors import REDIS_UNAVAILABLE, CallbackRefused
from core.settings import Settings
from core.webhooks import (
    BatchSummaries,
    Claim,
    DeliveryQueue,
    check_callback_url,
    enqueue_job,
    signed_headers,
)

log = logging.getLogger("reasonq.webhooks")

# Batch summaries queued per poll, so a burst of ended batches doesn't delay the sends.
SUMMARIES_PER_POLL = 100


class WebhookSender:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.queue = DeliveryQueue(redis, settings.result_ttl_s)
        self.summaries = BatchSummaries(redis, settings)
        # No redirects (a 3xx could point anywhere) and no proxies from the environment.
        self.client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        )
        self.sending: set[asyncio.Task[None]] = set()
        # An attempt is cut off at webhook_timeout_s; the lease outlives it, so a live
        # worker's attempt is never claimed twice.
        self.lease_s = 2 * settings.webhook_timeout_s + 5

    async def job_ended(self, job_id: str, spec: dict[str, Any]) -> None:
        """Queue the delivery of an ended job that has a callback (idempotent)."""
        if spec.get("callback_url"):
            await self.queue_job_delivery(job_id)

    async def queue_job_delivery(self, job_id: str) -> None:
        """``job_ended`` for a job whose record is not at hand (a no-op without callback)."""
        try:
            await enqueue_job(self.redis, job_id, self.settings, time.time())
        except Exception:  # the job itself is done; never fail it over its webhook
            log.exception("job %s: webhook not queued", job_id)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.webhook_poll_interval_s)
            try:
                await self.run_once()
            except REDIS_UNAVAILABLE as exc:  # a line per try, not a traceback twice a second
                log.warning("webhook sender: Redis unavailable (%s)", exc)
            except Exception:  # nothing must kill the loop
                log.exception("webhook sender")

    async def run_once(self) -> None:
        """Queue the summaries of ended batches, then claim the due deliveries this process
        has room for and start sending them."""
        await self.queue_batch_summaries()
        room = self.settings.webhook_concurrency - len(self.sending)
        if room <= 0:
            return
        for claim in await self.queue.claim(time.time(), self.lease_s, room):
            task = asyncio.create_task(self.attempt(claim))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def queue_batch_summaries(self) -> None:
        now = time.time()
        for batch_id in await self.summaries.claim(now, self.lease_s, SUMMARIES_PER_POLL):
            try:
                await self.summaries.queue(batch_id, now)
            except Exception:  # left listed: claimed again when its lease ends
                log.exception("batch %s: summary webhook not queued", batch_id)

    async def attempt(self, claim: Claim) -> None:
        """Send one attempt and record how it went."""
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                status = await self.post(claim)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self.settings.webhook_timeout_s:g} s"
        except CallbackRefused as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        s, now = self.settings, time.time()
        try:
            if error is None:
                await self.queue.record(claim, now, "delivered", status, None)
            elif claim.attempt >= s.webhook_max_attempts:
                log.warning("webhook %s: gave up after %d attempts: %s", claim.delivery_id,
                            claim.attempt, error)
                await self.queue.record(claim, now, "failed", status, error)
            else:
                backoff = s.webhook_backoff_s * 2 ** (claim.attempt - 1)
                delay = min(s.webhook_backoff_max_s, backoff)
                await self.queue.record(claim, now, "pending", status, error, now + delay)
        except Exception:  # unrecorded, the attempt is claimed again when its lease ends
            log.exception("webhook %s: outcome not recorded", claim.delivery_id)

    async def post(self, claim: Claim) -> int:
        """POST the signed body; the answer's status. The host is resolved and checked again
        here, so a DNS answer that changed since submission (rebinding to an internal
        address) is refused, not followed."""
        url = httpx.URL(claim.url)
        address = (await check_callback_url(claim.url, self.settings))[0]
        secret = self.settings.webhook_secret
        assert secret is not None  # check_callback_url refuses otherwise
        headers = signed_headers(
            secret.get_secret_value(), claim.body, int(time.time()), claim.delivery_id,
            claim.attempt,
        )
        # Connect to the checked address; Host header and TLS name stay the URL's host.
        headers["Host"] = url.netloc.decode("ascii")
        pinned = url.copy_with(host=str(address))
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        # Streamed and left unread: only the status matters, whatever size the body.
        async with self.client.stream(
            "POST", pinned, content=claim.body, headers=headers, extensions=extensions
        ) as response:
            return response.status_code

