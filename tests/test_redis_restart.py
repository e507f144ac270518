"""Redis goes away and comes back: the same worker and beat processes wait for it and
carry on. Redis is crashed (SIGKILL) mid-run and restarted on the same port with its
AOF, as deployed; workers and beat also start while Redis is down; and beat takes its
RedBeat lock again when Redis comes back without it."""

from __future__ import annotations

import time

import pytest
import redis

from plural_cancel.config.celery import DEFAULT_CONCURRENCY
from plural_cancel.config.settings import Settings
from plural_cancel.worker.keys import Keys
from tests.conftest import use_settings, wait_for
from tests.support.redis_server import RedisServer
from tests.support.workers import CeleryProcess, service_env, start_beat, start_worker

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)
UNACKED = Keys().unacked  # kombu's hash of the messages our workers hold (worker.broker)

CANCELS = 300
LIMIT = 50
"""Cancels per second to the sandbox: 300 cancels take about 6 s when nothing breaks."""

QUICK_RECOVERY = {"PLURAL_CONNECT_TIMEOUT": 1, "PLURAL_READ_TIMEOUT": 4, "CANCEL_STALL_TIMEOUT": 5}
"""Short HTTP timeouts (an 11-s attempt, so a 16-s lease: ``config.celery.lease_seconds``) and
a 5-s stall timeout, so that what the crash strands comes back from the due index sooner."""

LOCK_KEY = "plural-cancel:redbeat:lock"


@pytest.fixture
def redis_aof():
    """A redis-server of this test's own, persisted as deployed, that the test may crash."""
    server = RedisServer(prefix="pc-redis-restart-", aof=True)
    yield server
    server.stop()


def states(app, request_ids) -> list[str | None]:
    """The cancels' states; ``[]`` while this process's Redis connections reconnect."""
    try:
        return [s and s["state"] for s in app.runtime.ledger.statuses(request_ids)]
    except redis.ConnectionError:
        return []


def whereabouts(app, request_id: str) -> dict:
    """Where a cancel is: its record, its score in the ledger's due index, and
    how many of its messages the broker holds (the Request-ID is in a message's headers)."""
    keys, client = app.runtime.ledger.keys, app.runtime.redis
    found = {"record": app.runtime.ledger.status(request_id)}
    found["due"] = client.zscore(keys.due, request_id)
    found["queued_messages"] = sum(request_id.encode() in m for m in client.lrange(QUEUE, 0, -1))
    found["unacked_messages"] = sum(request_id.encode() in m for m in client.hvals(UNACKED))
    return found


def exits(processes) -> list[str]:
    """For each process that has exited: its kind, exit status and the last lines of its log."""
    return [f"celery {p.kind} exited {p.proc.returncode}:\n{p.log()[-3000:]}"
            for p in processes if p.proc.poll() is not None]


@pytest.mark.slow
def test_workers_and_beat_ride_out_a_redis_restart(redis_aof, healthy_sandbox, services, capsys):
    from plural_cancel.tasks import enqueue_many

    sandbox = healthy_sandbox
    # CANCEL_STALL_TIMEOUT: republish a live cancel whose message the crash lost (a
    # setting still to land on this branch; ignored until then).
    env = service_env(redis_aof.url, sandbox.url, PLURAL_RATE_LIMIT=LIMIT, **QUICK_RECOVERY)
    # The deployed concurrency: with free threads a worker is always mid-BRPOP, the state
    # in which kombu's teardown of the lost connection used to end it.
    services.extend([start_worker(env, concurrency=DEFAULT_CONCURRENCY) for _ in range(2)] + [start_beat(env)])
    pids = [p.proc.pid for p in services]
    app = use_settings(redis_aof.url, sandbox.url, PLURAL_RATE_LIMIT=LIMIT, **QUICK_RECOVERY)
    links = sandbox.create_links(CANCELS, status="CREATED", prefix="pl-restart-")
    request_ids = enqueue_many(links, app=app)
    wait_for(lambda: states(app, request_ids).count("succeeded") >= CANCELS // 4, 30, 0.1,
             "a quarter of the cancels done before the crash")

    redis_aof.kill()
    killed_at = time.time()
    time.sleep(2)
    redis_aof.restart()
    back_at = time.time()

    def done_or_exited():
        if exits(services):
            return "exited"
        return all(s == "succeeded" for s in states(app, request_ids) or [None]) and "done"

    try:
        # A cancel cut off mid-way by the crash is republished once its lease (30 s) runs out.
        outcome = wait_for(done_or_exited, 60, 0.5, f"{CANCELS} cancels succeeded")
    except AssertionError:
        left = [rid for rid, s in zip(request_ids, states(app, request_ids)) if s != "succeeded"]
        raise AssertionError(f"{len(left)} cancels not succeeded while every process runs, e.g. "
                             f"{[whereabouts(app, rid) for rid in left[:3]]}") from None
    finished_at = time.time()
    assert outcome == "done", "\n".join(exits(services))
    assert [p.proc.pid for p in services] == pids

    puts = [r["timestamp"] for r in sandbox.requests() if r["method"] == "PUT"]
    resumed = min(t for t in puts if t > back_at) - back_at
    assert all(sandbox.link(link)["cancel_count"] == 1 for link in links)
    with capsys.disabled():
        print(f"\n[redis restart] down {back_at - killed_at:.1f}s; first PUT {resumed:.1f}s after Redis was back; "
              f"all {CANCELS} succeeded {finished_at - back_at:.1f}s after")


@pytest.mark.slow
def test_a_worker_and_beat_started_while_redis_is_down_wait_for_it(redis_aof, healthy_sandbox, services):
    """They start, wait, and serve once Redis is up; beat then keeps its lock rule when
    Redis comes back without the lock (a failover to a replica that never saw it)."""
    from plural_cancel.tasks import enqueue_cancel, get_status

    sandbox = healthy_sandbox
    env = service_env(redis_aof.url, sandbox.url)
    redis_aof.kill()
    worker = CeleryProcess("worker", env, ["--loglevel=INFO", "--concurrency=4", "--without-mingle",
                                           "--without-gossip", "-n", f"w{time.monotonic_ns()}@%h"])
    beat = CeleryProcess("beat", env, ["--loglevel=INFO"])
    services.extend([worker, beat])
    wait_for(lambda: "Cannot connect" in worker.log() or exits(services), 20, 0.2, "the worker retrying")
    time.sleep(3)
    assert not exits(services), "\n".join(exits(services))

    redis_aof.restart()
    worker.wait_ready(60)
    wait_for(lambda: "beat: Acquired lock" in beat.log() or exits(services), 20, 0.2, "beat holding the lock")
    assert not exits(services), "\n".join(exits(services))
    app = use_settings(redis_aof.url, sandbox.url)
    [link] = sandbox.create_links(1, status="CREATED", prefix="pl-late-")
    request_id = enqueue_cancel(link, app=app)
    wait_for(lambda: (get_status(request_id, app=app) or {}).get("state") == "succeeded", 20, 0.2,
             "the cancel succeeded")

    app.runtime.redis.delete(LOCK_KEY)
    wait_for(lambda: beat.log().count("beat: Acquired lock") == 2 or exits(services), 20, 0.2,
             "beat holding the lock again")
    assert "the lock was lost while Redis was away" in beat.log()
    wait_for(lambda: (log := beat.log()).rindex("Sending due task") > log.rindex("beat: Acquired lock"), 10, 0.2,
             "beat firing again")
    assert not exits(services), "\n".join(exits(services))
