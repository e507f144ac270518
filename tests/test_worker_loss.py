"""A worker killed with SIGKILL mid-cancel (its whole process group, as when a host dies)."""

from __future__ import annotations

import time

from plural_cancel.config.settings import Settings
from plural_cancel.worker.keys import Keys
from tests.conftest import use_settings, wait_for
from tests.support.workers import service_env, start_worker

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)
UNACKED = Keys().unacked  # kombu's hash of the messages our workers hold (worker.broker)
SHORT_LEASE = {"PLURAL_CONNECT_TIMEOUT": 1, "PLURAL_READ_TIMEOUT": 3}


def test_a_cancel_in_flight_on_a_killed_worker_completes_on_another(module_redis_url, sandbox_process, capsys):
    from plural_cancel.tasks import enqueue_cancel, get_status

    sandbox = sandbox_process
    # Short timeouts make a short lease (a 9-s attempt, a 14-s lease; 32 s by default): the
    # cancel comes back when it runs out, whatever its length.
    env = service_env(module_redis_url, sandbox.url, **SHORT_LEASE)
    app = use_settings(module_redis_url, sandbox.url, **SHORT_LEASE)
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-kill-")
    # Hold the PUT in flight long enough to kill its worker (not the token: it would time out).
    sandbox.set_faults(latency_ms=4000, faults_skip_token=True)
    first = start_worker(env, concurrency=4)
    try:
        request_id = enqueue_cancel(link_id, app=app)
        wait_for(lambda: any(r["method"] == "PUT" and r.get("link_id") == link_id
                             for r in sandbox.requests()), 20, 0.02, "the PUT reaching the sandbox")
        assert get_status(request_id, app=app)["state"] == "running"
        first.kill_group()
        killed_at = time.monotonic()
    finally:
        first.stop()
    sandbox.set_faults(latency_ms=0, faults_skip_token=False)
    second = start_worker(env, concurrency=4)
    try:
        status = wait_for(lambda: (s := get_status(request_id, app=app))["state"] in ("succeeded", "failed") and s,
                          120, 0.2, "the cancel completing after the kill")
        recovery = time.monotonic() - killed_at
    finally:
        second.stop()
    assert status["state"] == "succeeded"
    # The killed worker's PUT may or may not have been applied by "Plural" before the kill:
    # either way the link ends cancelled exactly once, and every PUT carried the same Request-ID.
    assert status["outcome"] in ("cancelled", "already_cancelled")
    assert recovery < 120
    link = sandbox.link(link_id)
    assert link["status"] == "CANCELLED" and link["cancel_count"] == 1
    puts = [r for r in sandbox.requests() if r["method"] == "PUT" and r.get("link_id") == link_id]
    assert {p["request_id"] for p in puts} == {request_id}
    with capsys.disabled():
        print(f"\n[worker loss] cancel completed {recovery:.1f}s after SIGKILL of its worker's process group")


def queued_ids(client) -> set[str]:
    """The Request-IDs of the cancel messages waiting in the queue list."""
    import base64
    import json

    ids = set()
    for raw in client.lrange(QUEUE, 0, -1):
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.add(kwargs.get("request_id"))
    return ids


def test_sigterm_hands_the_cancel_in_flight_back_after_the_grace(module_redis_url, sandbox_process, capsys):
    """SIGTERM (``REMAP_SIGTERM=SIGQUIT``, as deployed) is Celery's soft shutdown: no new
    message is taken; after ``WORKER_SHUTDOWN_GRACE`` the message of the cancel still in
    flight goes back to Redis at once, while its HTTP call is still waiting on Plural.
    That call then ends and is recorded, so the next worker skips the copy: one PUT."""
    import os
    import signal

    import redis

    from plural_cancel.tasks import enqueue_cancel, enqueue_many, get_status

    sandbox = sandbox_process
    # A read timeout longer than the latency, so that the PUT outlasts the grace.
    env = service_env(module_redis_url, sandbox.url, WORKER_SHUTDOWN_GRACE="2", PLURAL_READ_TIMEOUT="30")
    app = use_settings(module_redis_url, sandbox.url)
    client = redis.Redis.from_url(module_redis_url)
    # The killed worker of the test before left its message unacknowledged (its cancel has
    # ended since, through the due index); kombu would restore it only after the visibility timeout.
    client.delete(UNACKED, f"{UNACKED}_index", QUEUE)
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-term-")
    later_links = sandbox.create_links(3, status="CREATED", prefix="pl-later-")
    worker = start_worker(env, concurrency=1)
    try:
        sandbox.set_faults(latency_ms=8_000, faults_skip_token=True)
        request_id = enqueue_cancel(link_id, app=app)
        wait_for(lambda: any(r["method"] == "PUT" and r.get("link_id") == link_id
                             for r in sandbox.requests()), 30, 0.05, "the PUT reaching the sandbox")
        later = enqueue_many(later_links, app=app)
        os.killpg(worker.proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        # Back in the queue (4 = it and the 3 never started), nothing unacknowledged,
        # while its PUT is still waiting on the sandbox.
        wait_for(lambda: queued_ids(client) >= {request_id, *later} and client.hlen(UNACKED) == 0, 20, 0.05,
                 "the message of the cancel in flight going back to Redis")
        handed_back = time.monotonic() - sent
        assert get_status(request_id, app=app)["state"] == "running"
        assert worker.proc.wait(40) is not None
    finally:
        sandbox.set_faults(latency_ms=0, faults_skip_token=False)
        worker.stop()
    log = worker.log()
    assert "Traceback" not in log and "NotImplementedError" not in log
    assert get_status(request_id, app=app)["outcome"] == "cancelled"  # the thread's answer, recorded
    assert all(get_status(rid, app=app)["state"] == "queued" for rid in later)

    second = start_worker(env, concurrency=4)
    try:
        wait_for(lambda: client.llen(QUEUE) == 0 and client.hlen(UNACKED) == 0
                 and all(get_status(rid, app=app)["state"] == "succeeded" for rid in later),
                 30, 0.1, "the next worker taking the 4 messages")
    finally:
        second.stop()
    link = sandbox.link(link_id)
    assert link["status"] == "CANCELLED" and link["cancel_count"] == 1
    puts = [r for r in sandbox.requests() if r["method"] == "PUT" and r.get("link_id") == link_id]
    assert len(puts) == 1
    with capsys.disabled():
        print(f"\n[sigterm] the cancel in flight went back to Redis {handed_back:.1f}s after SIGTERM "
              "(grace 2 s), its PUT still waiting on Plural")


def test_a_worker_without_remap_sigterm_says_so(module_redis_url, sandbox_process):
    env = service_env(module_redis_url, sandbox_process.url)
    del env["REMAP_SIGTERM"]
    worker = start_worker(env, concurrency=1)
    worker.stop()
    assert "REMAP_SIGTERM is not SIGQUIT" in worker.log()
    remapped = start_worker(service_env(module_redis_url, sandbox_process.url), concurrency=1)
    remapped.stop()
    assert "REMAP_SIGTERM" not in remapped.log()
