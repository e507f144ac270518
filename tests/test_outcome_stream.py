"""The outcome stream read by an order service's consumer group, with the example consumer
(``examples/outcome_consumer.py``) as written: each outcome handled once by the group,
across a worker killed mid-run and across a consumer that crashed holding entries."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

from examples.outcome_consumer import STREAM, OutcomeConsumer, decide, ensure_group
from tests.conftest import use_settings, wait_for
from tests.support.workers import service_env, start_worker

TERMINAL = ("succeeded", "failed")


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    # A short lease (2.5-s attempts: 7.5 s) and stall timeout, so a killed worker's cancels come back
    # soon. The producer's settings too: the enqueue sets when a cancel whose message is lost (a
    # worker killed between taking it and recording it) is sent again, the stall timeout from now.
    settings = dict(PLURAL_RATE_LIMIT="100", LIMITER_MAX_WAIT="0.5", PLURAL_CONNECT_TIMEOUT="0.5",
                    PLURAL_READ_TIMEOUT="1.5", CANCEL_ATTEMPT_TIMEOUT="2.5", CANCEL_STALL_TIMEOUT="3",
                    CANCEL_RETRY_BASE="0.2", CANCEL_RETRY_CAP="1")
    env = service_env(module_redis_url, sandbox_process.url, **settings)
    app = use_settings(module_redis_url, sandbox_process.url, **settings)
    yield {"app": app, "sandbox": sandbox_process, "env": env, "redis": redis.Redis.from_url(module_redis_url)}


class Running:
    """An :class:`OutcomeConsumer` on a thread, recording what it handled."""

    def __init__(self, client, group, name, **options):
        self.handled: list[dict[str, str]] = []
        self._stop = threading.Event()
        self.consumer = OutcomeConsumer(client, group, name, lambda _, event: self.handled.append(event),
                                        block_ms=200, **options)
        self.thread = threading.Thread(target=self.consumer.run, args=(self._stop.is_set,), daemon=True)
        self.thread.start()

    def ids(self) -> Counter:
        return Counter(event["request_id"] for event in self.handled)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def ended(app, request_ids) -> bool:
    return all(s and s["state"] in TERMINAL for s in app.runtime.ledger.statuses(request_ids))


def test_a_consumer_group_sees_each_outcome_once_across_a_worker_restart(system):
    from plural_cancel.tasks import enqueue_many

    app, sandbox, client = system["app"], system["sandbox"], system["redis"]
    ensure_group(client, "order-expiry")  # before any cancel: the stream is made empty
    assert client.xlen(STREAM) == 0
    consumer = Running(client, "order-expiry", "orders-1")
    links = sandbox.create_links(59, status="CREATED", prefix="pl-stream-")
    [paid] = sandbox.create_links(1, status="PROCESSED", prefix="pl-stream-paid-")
    sandbox.set_faults(latency_ms=400)
    first = start_worker(system["env"], concurrency=8)
    try:
        request_ids = enqueue_many([*links, paid], app=app)
        wait_for(lambda: len(consumer.handled) >= 15, 30, 0.05, "15 outcomes handled")
        first.kill_group()  # mid-run: cancels in flight, messages held unacknowledged
        assert not ended(app, request_ids)
    finally:
        first.stop()
    second = start_worker(system["env"], concurrency=8)
    try:
        wait_for(lambda: ended(app, request_ids), 60, 0.2, "every cancel ended")
        wait_for(lambda: len(consumer.handled) >= len(request_ids), 10, 0.05, "every outcome handled")
        time.sleep(1.0)  # a duplicate would have been handled by now
    finally:
        sandbox.reset_faults()
        consumer.stop()
        second.stop()
    assert consumer.ids() == Counter(request_ids)  # each once, none missing
    assert client.xpending(STREAM, "order-expiry")["pending"] == 0  # each acknowledged
    by_id = {event["request_id"]: event for event in consumer.handled}
    paid_event = by_id[request_ids[-1]]
    assert (paid_event["state"], paid_event["outcome"], paid_event["link_status"]) == (
        "failed", "not_cancellable", "PROCESSED")
    assert decide(paid_event) == "keep_paid"  # the customer paid: the order is not expired
    assert {decide(by_id[rid]) for rid in request_ids[:-1]} == {"expire"}
    assert set(paid_event) >= {"request_id", "payment_link_id", "state", "outcome", "link_status", "at"}


def test_entries_a_crashed_consumer_held_are_taken_over_by_another(system):
    """Consumer "a" is handed entries and dies before acknowledging them: consumer "b" of the
    same group takes them over once idle (XAUTOCLAIM), and handles the new ones too."""
    from plural_cancel.tasks import enqueue_many

    app, sandbox, client = system["app"], system["sandbox"], system["redis"]
    ensure_group(client, "crash-group", start="$")
    worker = start_worker(system["env"], concurrency=4)
    try:
        request_ids = enqueue_many(sandbox.create_links(10, status="CREATED", prefix="pl-crash-"), app=app)
        wait_for(lambda: ended(app, request_ids), 30, 0.1, "every cancel ended")
    finally:
        worker.stop()
    crashed = client.xreadgroup("crash-group", "a", {STREAM: ">"}, count=4)  # handed 4, never acknowledged
    assert len(crashed[0][1]) == 4
    survivor = Running(client, "crash-group", "b", claim_idle_ms=500)
    try:
        wait_for(lambda: len(survivor.handled) >= 10, 15, 0.05, "all 10 handled by b")
        time.sleep(0.5)
    finally:
        survivor.stop()
    assert survivor.ids() == Counter(request_ids)
    assert client.xpending(STREAM, "crash-group")["pending"] == 0
