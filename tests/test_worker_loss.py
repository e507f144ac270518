"""A worker killed with SIGKILL mid-cancel (its whole process group, as when a host dies)."""

from __future__ import annotations

import time

from tests.conftest import use_settings, wait_for
from tests.support.workers import service_env, start_worker


def test_a_cancel_in_flight_on_a_killed_worker_completes_on_another(module_redis_url, sandbox_process, capsys):
    from tasks import enqueue_cancel, get_status

    sandbox = sandbox_process
    env = service_env(module_redis_url, sandbox.url)
    app = use_settings(module_redis_url, sandbox.url)
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-kill-")
    sandbox.set_faults(latency_ms=4000)  # hold the PUT in flight long enough to kill its worker
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
    sandbox.set_faults(latency_ms=0)
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


def test_sigterm_lets_the_cancel_in_flight_finish_and_strands_nothing(module_redis_url, sandbox_process):
    """SIGTERM is Celery's warm shutdown: no new message is taken, the cancel in flight
    finishes (its HTTP call is bounded by the timeouts) and is recorded, and nothing is
    left unacknowledged in Redis. (The threads pool cannot kill a running cancel, so
    Celery's cold shutdown has nothing better to offer: see README, Operations.)"""
    import os
    import signal

    import redis

    from tasks import enqueue_cancel, enqueue_many, get_status

    sandbox = sandbox_process
    env = service_env(module_redis_url, sandbox.url)
    app = use_settings(module_redis_url, sandbox.url)
    client = redis.Redis.from_url(module_redis_url)
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-term-")
    worker = start_worker(env, concurrency=1)
    try:
        sandbox.set_faults(latency_ms=5_000, faults_skip_token=True)
        request_id = enqueue_cancel(link_id, app=app)
        wait_for(lambda: any(r["method"] == "PUT" and r.get("link_id") == link_id
                             for r in sandbox.requests()), 30, 0.05, "the PUT reaching the sandbox")
        later = enqueue_many(sandbox.create_links(3, status="CREATED", prefix="pl-later-"), app=app)
        os.killpg(worker.proc.pid, signal.SIGTERM)
        assert worker.proc.wait(60) == 0
    finally:
        sandbox.set_faults(latency_ms=0, faults_skip_token=False)
        worker.stop()
    assert get_status(request_id, app=app)["outcome"] == "cancelled"
    assert client.hlen("unacked") == 0
    # The cancels it never started are waiting in the queue for the next worker.
    assert client.llen("celery") == 3
    assert all(get_status(rid, app=app)["state"] == "queued" for rid in later)
