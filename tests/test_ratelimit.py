"""The shared rate limiter: strict per 1-second window, yet fast enough to drain at the limit."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import redis

from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ratelimit import RedisRateLimiter
from tests.support.scripts import acquire, reserve
from tests.support.timing import largest_window

KEY = Keys().ratelimit


def _hammer(client: redis.Redis, rate: float, burst: int, until: float, out: list[float]) -> None:
    """Reserve-and-sleep until ``until`` (epoch seconds), as a worker would; the granted slots'
    times into ``out`` (the answer's arrival plus the wait granted: the limiter's decision, not
    how late a busy machine wakes the thread, which the end-to-end tests see at the sandbox)."""
    limiter = RedisRateLimiter(client, KEY, rate, burst)
    while time.time() < until:
        reservation = reserve(limiter, max_wait=1.0)
        if reservation.granted:
            out.append(time.time() + reservation.wait)
            time.sleep(reservation.wait)
        else:
            time.sleep(min(reservation.wait, 0.2))  # a worker would defer; a thread just waits


def _hammer_process(redis_url: str, rate: float, duration: float) -> None:
    client = redis.Redis.from_url(redis_url)
    client.incr("test:ready")
    while not client.exists("test:go"):
        time.sleep(0.002)
    times: list[float] = []
    _hammer(client, rate, 0, time.time() + duration, times)
    if times:
        client.rpush("test:grants", *[repr(t) for t in times])


def test_threads_and_processes_together_never_exceed_the_limit_yet_drain_at_it(redis_url, redis_client):
    """Four threads and three processes, each with its own connection, reserve and sleep
    for 3 s. The slots granted hold no more than the limit in any 1-second window, give or
    take one at its edges, and the backlog drains at 95% of the limit or better. Rate 20 as in
    the acceptance run: 50 ms between slots leaves room for the scheduling noise of a busy
    test machine."""
    rate, duration = 20, 3.0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer_process, args=(redis_url, rate, duration)) for _ in range(3)]
    for p in procs:
        p.start()
    ready_by = time.monotonic() + 30
    while int(redis_client.get("test:ready") or 0) < 3:
        assert time.monotonic() < ready_by, "worker processes did not start in time"
        time.sleep(0.01)
    redis_client.set("test:go", 1)  # all compete from here on, each with its own connection
    thread_times: list[list[float]] = [[] for _ in range(4)]
    until = time.time() + duration
    threads = [threading.Thread(target=_hammer, args=(redis.Redis.from_url(redis_url), rate, 0, until, out))
               for out in thread_times]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    process_times = [float(x) for x in redis_client.lrange("test:grants", 0, -1)]
    assert len(process_times) > 10, "the processes hardly took a slot: they were not competing"
    times = sorted(process_times + [t for out in thread_times for t in out])

    assert largest_window(times) <= rate + 1
    mean_rate = (len(times) - 1) / (times[-1] - times[0])
    assert mean_rate >= 0.95 * rate, f"drained at {mean_rate:.1f}/s, limit {rate}/s"
    assert len(times) >= 0.95 * rate * duration


# Slots half a second apart (rate 2) keep the checks below clear of scheduling noise.

def test_burst_lets_that_many_go_at_once_above_the_steady_one(redis_client):
    limiter = RedisRateLimiter(redis_client, KEY, rate=2, burst=5)
    first = [reserve(limiter, max_wait=0) for _ in range(6)]
    assert all(r.granted and r.wait == 0 for r in first)
    after = reserve(limiter, max_wait=0)
    assert not after.granted and 0.4 <= after.wait <= 0.5


def test_without_burst_only_one_goes_at_once(redis_client):
    limiter = RedisRateLimiter(redis_client, KEY, rate=2)
    assert reserve(limiter, max_wait=0)[:2] == (True, 0.0)
    refused = reserve(limiter, max_wait=0)
    assert not refused.granted and 0.4 <= refused.wait <= 0.5


def test_a_slot_further_than_max_wait_is_not_taken(redis_client):
    limiter = RedisRateLimiter(redis_client, KEY, rate=2)
    assert reserve(limiter, max_wait=1)[:2] == (True, 0.0)
    granted = reserve(limiter, max_wait=1)
    assert granted.granted and 0.4 <= granted.wait <= 0.5
    # The next slot is ~1 s away: refused twice, and the refusals took nothing...
    for _ in range(2):
        refused = reserve(limiter, max_wait=0.7)
        assert not refused.granted and 0.9 <= refused.wait <= 1.0
    # ...so the slot a caller then reserves is still the one ~1 s away, not 2 s.
    later = reserve(limiter, max_wait=3)
    assert later.granted and 0.9 <= later.wait <= 1.0


def test_the_limiter_key_expires_once_idle(redis_client):
    limiter = RedisRateLimiter(redis_client, KEY, rate=100)
    reserve(limiter, max_wait=0)
    assert 0 < redis_client.pttl(KEY) <= 1010


def test_the_slots_follow_the_pace_and_the_pace_never_the_limit_up(redis_client):
    """A cut pace spaces the slots out; a pace climbed back is the limit, never above it."""
    limiter = RedisRateLimiter(redis_client, KEY, rate=20)
    assert limiter.pace() == (20.0, 0.0)
    now = float(redis_client.time()[0])
    # As a cut at 10/s just now leaves it (worker.pace): the climb starts at half the limit.
    redis_client.hset(limiter.pace_key, mapping={"cut": now, "start": 10.0, "target": 10.0, "at": now})
    assert limiter.effective_rate() == pytest.approx(10, abs=0.1)
    assert reserve(limiter, max_wait=0).granted
    assert 0.08 <= reserve(limiter, max_wait=1).wait <= 0.1  # slots ~0.1 s apart instead of 0.05 s
    redis_client.hset(limiter.pace_key, "cut", now - 1000)  # long since: climbed back, and capped
    assert limiter.effective_rate() == 20.0


def test_pacing_does_not_read_the_callers_clock(redis_client, monkeypatch):
    """Clock skew between hosts cannot move the limit: only Redis's TIME decides.

    Skewing a real host's clock is a fault a real thing cannot be made to show here, so
    this test mocks it: the caller's wall clock runs an hour ahead, and ten calls at 20
    per second still take 0.45 s on the monotonic clock, as without the skew (a limiter
    that trusted the caller's clock would let them all through at once, or none).
    """
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    limiter = RedisRateLimiter(redis_client, KEY, rate=20)
    started = time.monotonic()
    grants = []
    for _ in range(10):
        reservation = acquire(limiter, max_wait=1)
        assert reservation.granted and reservation.wait <= 0.05
        grants.append(time.monotonic() - started)
    assert 0.44 <= grants[-1] - grants[0] <= 0.6


def test_nonsense_settings_are_refused(redis_client):
    with pytest.raises(ValueError):
        RedisRateLimiter(redis_client, KEY, rate=0)
    with pytest.raises(ValueError):
        RedisRateLimiter(redis_client, KEY, rate=1, burst=-1)

