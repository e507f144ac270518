"""The cancel pipeline end to end: producer → Redis → a real Celery worker → the sandbox over HTTP."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from plural_cancel.config.settings import Settings
from tests.conftest import use_settings, wait_for
from tests.support.leaks import forbidden_values, found, redis_dump
from tests.support.scripts import claim
from tests.support.workers import service_env, start_worker

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)

TERMINAL = ("succeeded", "failed")


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    """Redis, the sandbox and one worker shared by the tests of this module."""
    env = service_env(module_redis_url, sandbox_process.url, CANCEL_RETRY_BASE="0.2", CANCEL_RETRY_CAP="1",
                      CANCEL_STALL_TIMEOUT="3")
    worker = start_worker(env, concurrency=8)
    app = use_settings(module_redis_url, sandbox_process.url, CANCEL_STALL_TIMEOUT="3")
    yield {"app": app, "sandbox": sandbox_process, "redis_url": module_redis_url, "env": env, "worker": worker}
    worker.stop()


def finished(app, request_id, timeout=30.0):
    from plural_cancel.tasks import get_status

    return wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in TERMINAL and s,
                    timeout, message=f"cancel {request_id} terminal")


def puts_for(sandbox, link_id):
    return [r for r in sandbox.requests() if r["method"] == "PUT" and r.get("link_id") == link_id]


def test_enqueue_reaches_plural_and_the_result_comes_back(system):
    from plural_cancel.tasks import enqueue_cancel, get_status

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-e2e-")
    request_id = enqueue_cancel(link_id, app=app)
    assert get_status(request_id, app=app)["state"] in ("queued", "running", "succeeded")

    status = finished(app, request_id)
    assert status["state"] == "succeeded" and status["outcome"] == "cancelled"
    assert status["link_status"] == "CANCELLED"
    assert status["attempts"] == 1
    assert status["request_id"] == request_id and status["payment_link_id"] == link_id
    assert status["created_at"] and status["updated_at"] and status["cancelled_at"]
    assert status["created_at"] <= status["updated_at"]
    assert status["amount"]["currency"] == "INR" and isinstance(status["amount"]["value"], int)
    assert status["last_error"] is None and status["next_attempt_at"] is None
    assert sandbox.link(link_id)["status"] == "CANCELLED"
    puts = puts_for(sandbox, link_id)
    assert [(p["status"], p["request_id"]) for p in puts] == [(200, request_id)]


def test_the_outcome_is_appended_to_the_stream(system):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-stream-")
    request_id = enqueue_cancel(link_id, request_id=f"stream-{link_id}", app=app)
    finished(app, request_id)
    client = redis.Redis.from_url(system["redis_url"], decode_responses=True)
    events = [fields for _, fields in client.xrange("plural-cancel:events")]
    mine = [e for e in events if e["request_id"] == request_id]
    assert len(mine) == 1
    assert mine[0]["outcome"] == "cancelled" and mine[0]["state"] == "succeeded"
    assert mine[0]["link_status"] == "CANCELLED" and mine[0]["attempts"] == "1"


@pytest.mark.parametrize("link_status, state, outcome", [
    ("CANCELLED", "succeeded", "already_cancelled"),
    ("PROCESSED", "failed", "not_cancellable"),
    ("PARTIAL_PROCESSED", "failed", "not_cancellable"),
    ("EXPIRED", "failed", "not_cancellable"),
])
def test_a_refused_cancel_is_decided_by_the_links_status(system, link_status, state, outcome):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status=link_status, prefix=f"pl-{link_status.lower()[:4]}-")
    status = finished(app, enqueue_cancel(link_id, app=app))
    assert (status["state"], status["outcome"], status["link_status"]) == (state, outcome, link_status)
    assert status["attempts"] == 1
    if state == "failed":
        assert status["last_error"]["http_status"] == 400
        assert status["last_error"]["code"] == "INVALID_REQUEST"
    gets = [r for r in sandbox.requests() if r["method"] == "GET" and r.get("link_id") == link_id]
    assert len(gets) == 1


def test_an_unknown_link_is_rejected(system):
    from plural_cancel.tasks import enqueue_cancel

    app = system["app"]
    status = finished(app, enqueue_cancel("pl-v1-000000000000-aa-nosuch", app=app))
    assert (status["state"], status["outcome"]) == ("failed", "rejected")
    assert status["last_error"]["http_status"] == 404
    assert status["link_status"] is None


def test_a_payment_in_flight_is_tried_again_later(system):
    from plural_cancel.tasks import enqueue_cancel, get_status

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="PAYMENT_INITIATED", prefix="pl-inflight-")
    request_id = enqueue_cancel(link_id, app=app)
    wait_for(lambda: (s := get_status(request_id, app=app))["state"] == "retrying" and s, 15,
             message="retrying")
    sandbox.set_link_status(link_id, "CREATED")  # the payment failed: the link can be cancelled now
    status = finished(app, request_id)
    assert (status["state"], status["outcome"]) == ("succeeded", "cancelled")
    assert status["attempts"] >= 2
    assert {p["request_id"] for p in puts_for(sandbox, link_id)} == {request_id}


def _enqueue_repeatedly(redis_url: str, link_id: str, request_id: str, times: int, barrier) -> list[str]:
    app = use_settings(redis_url)
    from plural_cancel.tasks import enqueue_cancel

    barrier.wait()
    return [enqueue_cancel(link_id, request_id=request_id, app=app) for _ in range(times)]


def test_one_request_id_enqueued_50_times_from_5_processes_is_one_cancel(system):
    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-dup-")
    request_id = f"order-{link_id}-expiry"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(5)
    with ctx.Pool(5) as pool:
        results = pool.starmap(_enqueue_repeatedly, [(system["redis_url"], link_id, request_id, 10, barrier)] * 5)
    assert [rid for batch in results for rid in batch] == [request_id] * 50
    status = finished(app, request_id)
    assert status["outcome"] == "cancelled" and status["attempts"] == 1
    time.sleep(1.0)  # any duplicate message would have run by now
    client = redis.Redis.from_url(system["redis_url"])
    assert len([k for k in client.scan_iter(f"plural-cancel:req:{request_id}*")]) == 1
    assert len(puts_for(sandbox, link_id)) == 1


def test_a_request_id_reused_for_another_link_is_refused(system):
    from plural_cancel.errors import RequestIdConflict
    from plural_cancel.tasks import enqueue_cancel

    app = system["app"]
    enqueue_cancel("pl-reuse-a", request_id="reused-key", app=app)
    with pytest.raises(RequestIdConflict, match="request_id"):
        enqueue_cancel("pl-reuse-b", request_id="reused-key", app=app)


@pytest.mark.parametrize("link_id, request_id, field", [
    ("", None, "payment_link_id"), ("../x", None, "payment_link_id"), ("a/b", None, "payment_link_id"),
    ("pl 1", None, "payment_link_id"), ("x" * 51, None, "payment_link_id"),
    ("pl-ok", "has space", "request_id"), ("pl-ok", "r" * 51, "request_id"), ("pl-ok", "", "request_id"),
])
def test_bad_input_writes_nothing_and_sends_nothing(system, link_id, request_id, field):
    from plural_cancel.tasks import enqueue_cancel, enqueue_many

    client = redis.Redis.from_url(system["redis_url"])

    def written():  # records and messages; the worker may be finishing other cancels
        return set(client.scan_iter("plural-cancel:req:*")), client.llen(QUEUE)

    before = written()
    with pytest.raises(ValueError, match=field):
        enqueue_cancel(link_id, request_id=request_id, app=system["app"])
    if request_id is None:
        with pytest.raises(ValueError, match=field):
            enqueue_many(["pl-fine-1", link_id], app=system["app"])
    assert written() == before


def test_enqueue_many_cancels_them_all(system):
    from plural_cancel.tasks import enqueue_many

    app, sandbox = system["app"], system["sandbox"]
    links = sandbox.create_links(40, status="CREATED", prefix="pl-many-")
    request_ids = enqueue_many(links, app=app)
    assert len(set(request_ids)) == 40
    for request_id in request_ids:
        assert finished(app, request_id)["outcome"] == "cancelled"
    assert all(sandbox.link(link)["status"] == "CANCELLED" for link in links)


def test_send_task_by_name_from_a_process_that_never_imported_tasks(system):
    from plural_cancel.tasks import get_status

    sandbox = system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-byname-")
    code = textwrap.dedent(f"""
        import sys
        from celery import Celery
        other = Celery("another-service", broker={system['redis_url']!r})
        other.send_task("tasks.cancel_payment_link",
                        kwargs={{"payment_link_id": {link_id!r}, "request_id": "byname-{link_id}"}},
                        queue={QUEUE!r})
        ours = ("tasks.", "worker", "plural_cancel")
        assert not any(m == "tasks" or m.startswith(ours) for m in sys.modules), "imported our code"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=60)
    status = finished(system["app"], f"byname-{link_id}")
    assert (status["state"], status["outcome"]) == ("succeeded", "cancelled")
    assert get_status(f"byname-{link_id}", app=system["app"])["payment_link_id"] == link_id


def test_a_record_whose_message_never_left_is_sent_by_the_due_index(system):
    """The producer died between its two writes: a record, and no message. The workers'
    pump sends it once its stall timeout (3 s here) has passed."""
    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-lost-")
    assert app.runtime.ledger.create_many([("lost-message-1", link_id)]) == [1]
    status = finished(app, "lost-message-1", timeout=15)
    assert status["outcome"] == "cancelled"
    client = redis.Redis.from_url(system["redis_url"])
    assert client.zscore("plural-cancel:due", "lost-message-1") is None  # ended: out of the index


def test_nothing_personal_or_secret_is_left_in_redis(system):
    """Scan every key and value (broker messages included) after the runs above."""
    from plural_cancel.tasks import enqueue_cancel

    sandbox = system["sandbox"]
    # A demo link carries a full customer (e-mail, phone, names, addresses) in Plural's answer.
    assert finished(system["app"], enqueue_cancel("pl-demo-created-01", app=system["app"]))["outcome"] in (
        "cancelled", "already_cancelled")
    forbidden = forbidden_values(sandbox, ["pl-demo-created-01"], "test-secret-do-not-leak")
    assert len(forbidden) >= 8
    text = redis_dump(redis.Redis.from_url(system["redis_url"]))
    assert b"plural-cancel:req:" in text  # the scan saw the ledger
    assert found(text, forbidden) == []


def test_a_cancel_whose_lease_ran_out_is_sent_again(system):
    """A worker claimed a cancel and vanished with its message: the pump sends it again once the lease ends."""
    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-stranded-")
    ledger = app.runtime.ledger
    assert ledger.create_many([("stranded-1", link_id)]) == [1]  # no message: as if taken by the dead worker
    assert claim(ledger, "stranded-1", link_id, "a-worker-that-died", lease=1.0).verdict == "claimed"
    status = finished(app, "stranded-1", timeout=15)
    assert (status["state"], status["outcome"], status["attempts"]) == ("succeeded", "cancelled", 1)


def test_a_second_cancel_of_a_link_follows_the_live_one_and_ends_with_it(system):
    """Two producers, two Request-IDs, one link: Plural sees one Request-ID, and the second
    ends as soon as the first does (not after a lock's TTL)."""
    from plural_cancel.tasks import enqueue_cancel, enqueue_many, get_status

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-twice-")
    sandbox.set_faults(latency_ms=1500)
    try:
        first = enqueue_cancel(link_id, app=app)
        wait_for(lambda: get_status(first, app=app)["state"] == "running", 10, 0.02, message="first running")
        second = enqueue_cancel(link_id, app=app)
        [third, fourth] = enqueue_many([link_id, link_id], app=app)
        assert get_status(second, app=app)["follows"] == first
        leader = finished(app, first)
        others = [finished(app, rid, timeout=5) for rid in (second, third, fourth)]
    finally:
        sandbox.reset_faults()
    assert (leader["state"], leader["outcome"]) == ("succeeded", "cancelled")
    for other in others:
        assert (other["state"], other["outcome"], other["follows"]) == ("succeeded", "cancelled", first)
        assert other["link_status"] == "CANCELLED" and other["attempts"] == 0
        assert other["updated_at"] == leader["updated_at"]  # ended in the same script as the leader
    assert {p["request_id"] for p in puts_for(sandbox, link_id)} == {first}
    client = redis.Redis.from_url(system["redis_url"])
    events = [fields for _, fields in client.xrange("plural-cancel:events")]
    assert {e[b"request_id"].decode() for e in events} >= {first, second, third, fourth}
    # The link is free again: a later cancel leads (and finds it cancelled already).
    later = enqueue_cancel(link_id, app=app)
    assert finished(app, later)["outcome"] == "already_cancelled"
    assert get_status(later, app=app)["follows"] is None

