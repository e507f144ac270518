"""Scheduled cancels end to end: real beat processes (RedBeat), a real worker, the sandbox.

One worker and one beat serve the module; a second beat joins for the availability test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis

from tests.conftest import use_settings, wait_for
from tests.support.workers import ROOT, service_env, start_beat, start_worker

SENT = "Sending due task fire-schedules"


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    env = service_env(module_redis_url, sandbox_process.url)
    worker = start_worker(env, concurrency=8)
    beat = start_beat(env)
    app = use_settings(module_redis_url, sandbox_process.url)
    wait_for(lambda: "beat: Acquired lock" in beat.log(), 15, message="first beat holds the lock")
    yield {"app": app, "sandbox": sandbox_process, "env": env, "beat": beat, "redis_url": module_redis_url}
    beat.stop()
    worker.stop()


def puts(sandbox, link_id: str) -> list[dict]:
    return [r for r in sandbox.requests() if r["method"] == "PUT" and r.get("link_id") == link_id]


def test_a_scheduled_cancel_arrives_on_time_and_an_unscheduled_one_never(system):
    from plural_cancel.tasks import get_status, schedule_cancel, unschedule_cancel

    app, sandbox = system["app"], system["sandbox"]
    kept, paid = sandbox.create_links(2, prefix="pl-sched-")
    at = datetime.now(timezone.utc) + timedelta(seconds=3)
    request_id = schedule_cancel(kept, at, app=app)
    schedule_cancel(paid, at, app=app)
    assert unschedule_cancel(paid, app=app) is True

    [put] = wait_for(lambda: puts(sandbox, kept), 8, interval=0.05, message="the scheduled PUT")
    # Sent (its Request-Timestamp, cut to the millisecond) no earlier than its time, and
    # within a beat tick (1 s) and two messages' delivery of it: those took up to 1.1 s
    # more with the whole suite on two cores (2.12 s seen), so the bound is 3 s.
    assert at.timestamp() - 0.001 <= put["sent_at"] <= at.timestamp() + 3.0
    assert put["request_id"] == request_id and put["status"] == 200
    wait_for(lambda: (get_status(request_id, app=app) or {}).get("outcome") == "cancelled", 10,
             message="cancelled")
    time.sleep(max(0.0, at.timestamp() + 2.5 - time.time()))
    assert puts(sandbox, paid) == []
    assert sandbox.link(paid)["status"] == "CREATED"


def test_two_beats_fire_each_due_cancel_once_and_the_second_takes_over(system):
    from plural_cancel.tasks import get_status, schedule_cancel

    app, sandbox, first = system["app"], system["sandbox"], system["beat"]
    second = start_beat(system["env"])
    try:
        time.sleep(1.0)  # both running; only the lock holder ticks
        links = sandbox.create_links(12, prefix="pl-twobeats-")
        at = datetime.now(timezone.utc) + timedelta(seconds=1.5)
        request_ids = [schedule_cancel(link, at, app=app) for link in links]
        for request_id in request_ids:
            wait_for(lambda: (get_status(request_id, app=app) or {}).get("state") == "succeeded", 15,
                     message=f"{request_id} succeeded")
        time.sleep(1.0)  # a second firing would have reached the sandbox by now
        assert [len(puts(sandbox, link)) for link in links] == [1] * len(links)
        client = redis.Redis.from_url(system["redis_url"], decode_responses=True)
        recorded = [client.hget(key, "payment_link_id") for key in client.scan_iter("plural-cancel:req:*")]
        assert sorted(link for link in recorded if link in links) == sorted(links)  # one record each
        assert "Acquired lock" not in second.log() and SENT not in second.log()
        assert SENT in first.log()

        # The lock holder stops (it releases the lock): the other one fires from then on.
        first.stop()
        wait_for(lambda: "beat: Acquired lock" in second.log(), 12, message="second beat takes the lock")
        [link] = sandbox.create_links(1, prefix="pl-takeover-")
        request_id = schedule_cancel(link, datetime.now(timezone.utc), app=app)
        wait_for(lambda: (get_status(request_id, app=app) or {}).get("state") == "succeeded", 10,
                 message="fired by the second beat")
        assert SENT in second.log()
        assert len(puts(sandbox, link)) == 1
    finally:
        second.stop()


def test_bulk_wait_follows_the_outcomes(system, tmp_path):
    sandbox = system["sandbox"]
    links = sandbox.create_links(5, prefix="pl-bulkwait-")
    path = tmp_path / "links.txt"
    path.write_text("\n".join(links + ["pl-v1-000000000000-aa-nosuch"]) + "\n")
    result = subprocess.run([str(Path(sys.executable).with_name("plural-cancel")), "bulk", str(path), "--wait",
                             "--timeout", "30"], cwd=ROOT, env=system["env"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["accepted", "6"] in lines
    assert ["cancelled", "5"] in lines and ["rejected", "1"] in lines
    assert all(sandbox.link(link)["status"] == "CANCELLED" for link in links)
