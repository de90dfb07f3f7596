"""``core.broker.task_message`` writes the entry kombu itself would push for a job."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from core import keys
from core.broker import RUN_JOB, app, task_message

# Differ per publish (tags, reply queue) or are copies kombu leaves in the properties.
_PER_PUBLISH = {"delivery_tag", "reply_to", "argsrepr", "kwargsrepr"}


def record(job_id: str, priority: int) -> dict:
    return {
        "id": job_id, "status": "queued", "created_at": 1.5, "task_type": "chat",
        "runtime": "vllm", "queue": "gpu", "priority": priority, "owner": "anonymous",
        "metadata": {"k": "v"}, "prompt_chars": 5,
        "request": {"messages": [{"role": "user", "content": "héllo"}], "max_tokens": 8},
    }  # fmt: skip


def decoded(entry: bytes | str) -> dict:
    message = json.loads(entry)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


@pytest.mark.parametrize("priority", [9, 5, 0])
def test_entry_matches_what_kombu_publishes(redis_url: str, priority: int) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    ours = task_message(record("ours", priority), show_content=False)
    theirs_record = record("theirs", priority)
    summary = {"runtime": "vllm", "task_type": "chat", "prompt_chars": 5}
    with app.connection_for_write(redis_url) as connection:
        app.send_task(
            RUN_JOB, args=["theirs", theirs_record], task_id="theirs", queue="gpu",
            priority=9 - priority, argsrepr=repr(("theirs",)), kwargsrepr=repr(summary),
            connection=connection,
        )  # fmt: skip
    (list_key,) = [k for k in client.keys("gpu*")]
    assert list_key.decode() == ours.queue_list == keys.queue_lists("gpu")[9 - priority]
    theirs = decoded(client.lindex(list_key, 0))
    mine = decoded(ours.entry)
    assert mine["body"] == json.loads(json.dumps(theirs["body"]).replace("theirs", "ours"))
    assert mine["headers"] == json.loads(json.dumps(theirs["headers"]).replace("theirs", "ours"))
    assert mine["headers"]["argsrepr"] == "('ours',)"  # Flower shows no prompt
    for name in ("content-type", "content-encoding"):
        assert mine[name] == theirs[name]
    strip = lambda props: {k: v for k, v in props.items() if k not in _PER_PUBLISH}
    assert strip(mine["properties"]) == json.loads(
        json.dumps(strip(theirs["properties"])).replace("theirs", "ours")
    )
    client.close()


def test_show_content_leaves_the_arguments_visible() -> None:
    headers = json.loads(task_message(record("j", 5), show_content=True).entry)["headers"]
    assert "'owner': 'anonymous'" in headers["argsrepr"]
