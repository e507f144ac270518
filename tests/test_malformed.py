"""Malformed messages on the queue: a real worker drops, logs and counts them, and keeps consuming.

Each test pushes what a broken or foreign producer could put on the queue list in the
broker's Redis database, then sends a real cancel through the producer API and sees it
succeed on the same worker process; the fleet-wide count (``worker.malformed``) rises
by one per message under its reason.
"""

from __future__ import annotations

import json

import pytest
import redis
from kombu import Producer

from plural_cancel.worker import malformed
from plural_cancel.worker.keys import Keys
from tests.conftest import use_settings, wait_for
from tests.support.workers import service_env, start_worker


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    """Redis, the sandbox and one worker shared by the tests of this module."""
    env = service_env(module_redis_url, sandbox_process.url)
    worker = start_worker(env, concurrency=2)
    app = use_settings(module_redis_url, sandbox_process.url)
    client = redis.Redis.from_url(module_redis_url)
    yield {"app": app, "sandbox": sandbox_process, "worker": worker, "redis": client,
           "queue": app.conf.task_default_queue}
    client.close()
    worker.stop()


def counts(system) -> dict[str, int]:
    return malformed.counts(system["redis"], Keys())


def dropped(system, before: dict[str, int], **rises: int) -> dict[str, int]:
    """Wait until the counts are ``before`` plus ``rises``, and exactly that."""
    expected = {reason: n + rises.get(reason, 0) for reason, n in before.items()}
    wait_for(lambda: counts(system) == expected, 10, message=f"counts {expected}")
    return expected


def log_lines(system, text: str) -> list[dict]:
    """The worker's log lines (JSON: stderr is a file) whose message contains ``text``."""
    lines = [json.loads(line) for line in system["worker"].log().splitlines() if line.startswith("{")]
    return [line for line in lines if text in line["message"]]


def cancel_succeeds(system, prefix: str) -> None:
    """A real cancel, enqueued after the bad message, succeeds on the same worker process."""
    from plural_cancel.tasks import enqueue_cancel, get_status

    app, sandbox, worker = system["app"], system["sandbox"], system["worker"]
    pid = worker.proc.pid
    [link_id] = sandbox.create_links(1, status="CREATED", prefix=prefix)
    request_id = enqueue_cancel(link_id, app=app)
    status = wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed") and s,
                      30, message=f"cancel {request_id} terminal")
    assert (status["state"], status["outcome"]) == ("succeeded", "cancelled")
    assert worker.proc.poll() is None and worker.proc.pid == pid, worker.log()[-3000:]


def test_an_item_that_is_not_json_is_dropped_and_the_worker_keeps_consuming(system):
    client, queue = system["redis"], system["queue"]
    before = counts(system)
    bad = b"not json{ ravi@example.com \xff"
    client.lpush(queue, bad)

    assert dropped(system, before, undecodable=1)[malformed.UNDECODABLE] == before[malformed.UNDECODABLE] + 1
    assert client.llen(queue) == 0  # dropped, not put back to be read again and again
    cancel_succeeds(system, "pl-malformed-json-")
    [line] = log_lines(system, "not JSON")
    assert line["level"] == "error" and line["logger"] == "plural_cancel.worker.broker"
    assert (line["queue"], line["reason"]) == (queue, "undecodable")
    assert line["bytes"] == len(bad) + 2  # the one invalid byte is read as U+FFFD, three bytes
    assert "ravi" not in system["worker"].log()  # the content is never logged


@pytest.mark.parametrize("item, json_type", [(b"[1, 2]", "list"), (b'{"order": "o-1"}', "dict"), (b"7", "int")])
def test_json_that_is_not_a_kombu_message_is_dropped(system, item, json_type):
    client, queue = system["redis"], system["queue"]
    before = counts(system)
    seen = len(log_lines(system, "JSON but not a kombu message"))
    client.lpush(queue, item)

    dropped(system, before, not_a_task_message=1)
    cancel_succeeds(system, "pl-malformed-shape-")
    lines = log_lines(system, "JSON but not a kombu message")
    assert len(lines) == seen + 1
    assert (lines[-1]["level"], lines[-1]["queue"], lines[-1]["json_type"]) == ("error", queue, json_type)


def test_a_kombu_message_whose_body_is_not_base64_is_dropped(system):
    client, queue = system["redis"], system["queue"]
    before = counts(system)
    envelope = {"body": "abc", "headers": {}, "content-type": "application/json", "content-encoding": "utf-8",
                "properties": {"delivery_tag": "t-1", "body_encoding": "base64",
                               "delivery_info": {"exchange": "", "routing_key": queue}}}
    client.lpush(queue, json.dumps(envelope))

    dropped(system, before, undecodable=1)
    cancel_succeeds(system, "pl-malformed-base64-")
    [line] = log_lines(system, "undecodable body")
    assert (line["level"], line["queue"], line["bytes"]) == ("error", queue, 3)


def test_a_kombu_message_that_is_not_a_celery_task_is_counted(system):
    """Celery itself logs and discards it (signal ``task_rejected``)."""
    app, queue = system["app"], system["queue"]
    before = counts(system)
    with app.connection_for_write() as conn:
        Producer(conn).publish({"hello": "world"}, routing_key=queue, serializer="json")

    dropped(system, before, not_a_task_message=1)
    cancel_succeeds(system, "pl-malformed-notask-")
    [line] = log_lines(system, "Received and deleted unknown message")
    assert line["level"] == "warning"


def test_a_task_this_worker_does_not_have_is_counted(system):
    """Celery itself logs and discards it (signal ``task_unknown``)."""
    app = system["app"]
    before = counts(system)
    app.send_task("tasks.no_such_task", kwargs={"payment_link_id": "pl-x"})

    dropped(system, before, unknown_task=1)
    cancel_succeeds(system, "pl-malformed-unknown-")
    [line] = log_lines(system, "Received unregistered task of type 'tasks.no_such_task'")
    assert line["level"] == "error"


def test_count_takes_only_the_known_reasons(redis_client):
    keys = Keys(prefix="test-malformed")
    assert malformed.counts(redis_client, keys) == dict.fromkeys(malformed.REASONS, 0)
    assert malformed.count(redis_client, keys, malformed.BAD_ARGUMENTS) == 1
    assert malformed.count(redis_client, keys, malformed.BAD_ARGUMENTS) == 2
    with pytest.raises(ValueError, match="reason must be one of"):
        malformed.count(redis_client, keys, "typo")
    assert malformed.counts(redis_client, keys) == {**dict.fromkeys(malformed.REASONS, 0), "bad_arguments": 2}
