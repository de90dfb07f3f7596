"""/v1/jobs: submit, read (optionally waiting for the end), cancel."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from api.deps import HubDep, OwnerDep, RedisDep, SettingsDep, StoreDep
from api.limits import QuotaDep, RateLimit
from api.metrics import JOBS_SUBMITTED
from api.schemas import ErrorResponse, JobCreate, JobPublic
from api.submission import build_record, new_job_id
from core import keys
from core.broker import task_message
from core.errors import IdempotencyConflict, JobNotFound
from core.jobs import TERMINAL, JobStatus, JobStore
from core.public import job_view
from core.webhooks import check_callback_url, enqueue_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND = {404: {"model": ErrorResponse, "description": "Unknown job"}}


def job_public(record: dict[str, str], base_url: str) -> JobPublic:
    # The same view webhooks carry (core.public), so a callback and a GET agree.
    return JobPublic.model_validate(job_view(record, base_url))


def base_url(request: Request, public_url: str | None) -> str:
    return (public_url or str(request.base_url)).rstrip("/")


async def read_job(store: JobStore, job_id: str, owner: str) -> dict[str, str]:
    record = await store.get(job_id)
    if record is None or record.get("owner", owner) != owner:
        raise JobNotFound(f"no job {job_id!r}")
    return record


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "With ``wait``: the job ended meanwhile"},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused"},
        429: {"model": ErrorResponse, "description": "Key's rate limit or job quota reached"},
    },
    dependencies=[RateLimit],
)
async def create_job(
    job: JobCreate,
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    owner: OwnerDep,
    quota: QuotaDep,
    hub: HubDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    wait: Annotated[
        float, Query(ge=0, le=60, description="Seconds to wait for the job to end.")
    ] = 0,
) -> JobPublic:
    """Queue a job; answers at once (202) with its id and URL, to poll or wait on. With
    ``wait``, answers as soon as the job ends (200, with its result), else after ``wait``
    seconds (202): one request for a short job."""
    job_id = new_job_id()
    url = base_url(request, settings.public_url)

    async def answer(record: dict[str, str]) -> JobPublic:
        if wait and record["status"] not in TERMINAL:
            record = await wait_for_end(store, hub, record["id"], owner, wait)
        if wait and record["status"] in TERMINAL:
            response.status_code = status.HTTP_200_OK
        return job_public(record, url)  # as accepted, or as it ended within ``wait``

    callback_url = str(job.callback_url) if job.callback_url else None
    if callback_url:
        await check_callback_url(callback_url, settings)
    record = build_record(
        job, job_id, settings, owner, callback_url=callback_url,
        # The API's URL as this client sees it: the job link in the webhook body.
        api_url=url if callback_url else None,
    )
    if idempotency_key:
        fingerprint = hashlib.sha256(job.model_dump_json().encode()).hexdigest()
        existing = await claim_idempotency_key(
            redis, owner, idempotency_key, job_id, fingerprint, settings.result_ttl_s
        )
        if existing is not None:
            response.headers["Idempotent-Replayed"] = "true"
            replayed = await store.get(existing)
            if replayed is not None:
                return await answer(replayed)
            # The first attempt died before storing its job: finish its work under its id.
            record["id"] = job_id = existing
    async with quota.admit([job_id]):
        created = await store.create(record, task_message(record, settings.flower_show_content))
    JOBS_SUBMITTED.labels(record["runtime"]).inc()
    response.headers["Location"] = f"{url}/v1/jobs/{job_id}"
    return await answer(created)


async def claim_idempotency_key(
    redis: RedisDep, owner: str, key: str, job_id: str, fingerprint: str, ttl: int
) -> str | None:
    """None when ``key`` is new (now bound to ``job_id``), else the job it already names."""
    redis_key = keys.idempotency(owner, key)
    if await redis.set(redis_key, f"{job_id} {fingerprint}", nx=True, ex=ttl):
        return None
    existing_id, existing_fingerprint = (await redis.get(redis_key)).decode().split()
    if existing_fingerprint != fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was used for a different request; use a new key"
        )
    return existing_id


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
async def get_job(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    hub: HubDep,
    owner: OwnerDep,
    wait: Annotated[
        float, Query(ge=0, le=60, description="Seconds to wait for the job to end.")
    ] = 0,
) -> JobPublic:
    """The job's status, timestamps and result or error. With ``wait``, answers as soon as
    the job ends (or when ``wait`` seconds have passed), instead of polling."""
    record = await read_job(store, job_id, owner)
    if wait and record["status"] not in TERMINAL:
        record = await wait_for_end(store, hub, job_id, owner, wait)
    return job_public(record, base_url(request, settings.public_url))


async def wait_for_end(
    store: JobStore, hub: HubDep, job_id: str, owner: str, timeout: float
) -> dict[str, str]:
    async with hub.listen(keys.job_events(job_id)) as events:
        record = await read_job(store, job_id, owner)  # re-read: subscribed now, no gap
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while record["status"] not in TERMINAL:
                    event = await events.get()
                    if event.get("type") == "status" and event["status"] in TERMINAL:
                        record = event.get("record") or await read_job(store, job_id, owner)
        return record


@router.delete("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
async def cancel_job(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    hub: HubDep,
    owner: OwnerDep,
) -> JobPublic:
    """Cancel a job. A queued job never runs; a running one stops at its next token or
    stream chunk. Answers once the job reads ``cancelled`` (or after 10 s)."""
    await read_job(store, job_id, owner)
    if await store.cancel(job_id) == JobStatus.RUNNING:
        record = await wait_for_end(store, hub, job_id, owner, 10.0)
    else:
        record = await read_job(store, job_id, owner)
        if "callback_url" in record and record["status"] == JobStatus.CANCELLED:
            # Send now, not when a worker meets the cancelled job's message in the queue.
            await enqueue_job(redis, job_id, settings, time.time())
            record = await read_job(store, job_id, owner)
    return job_public(record, base_url(request, settings.public_url))


__all__ = ["base_url", "job_public", "read_job", "router"]
