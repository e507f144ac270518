"""The shared circuit breaker: opens once, holds calls back, lets one probe test recovery."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from worker.breaker import Gate, NoBreaker, RedisCircuitBreaker
from worker.keys import Keys

KEY = Keys().breaker


def breaker(client: redis.Redis, **kwargs) -> RedisCircuitBreaker:
    options = {"threshold": 3, "cooldown": 0.5, "max_cooldown": 1.5, "probe_ttl": 5.0}
    options.update(kwargs)
    return RedisCircuitBreaker(client, KEY, **options)


def open_breaker(b: RedisCircuitBreaker) -> None:
    opened = [b.record_failure(probe=False) for _ in range(b.threshold)]
    assert opened[-1] and not any(opened[:-1])


def at_once(n: int, redis_url: str, call) -> list:
    """Run ``call(client)`` in ``n`` threads released together, each with its own connection."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        client = redis.Redis.from_url(redis_url)
        barrier.wait()
        results[i] = call(client)
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_consecutive_failures_open_it_and_a_success_resets_the_count(redis_client):
    b = breaker(redis_client)
    assert b.record_failure(probe=False) is False
    assert b.record_failure(probe=False) is False
    b.record_success(probe=False)
    assert b.state()["failures"] == 0
    assert b.record_failure(probe=False) is False
    assert b.record_failure(probe=False) is False
    assert b.allow() == Gate(True, False, 0.0)
    assert b.record_failure(probe=False) is True
    state = b.state()
    assert state["state"] == "open" and state["failures"] == 3
    assert state["reopens_at"] == pytest.approx(state["opened_at"] + 0.5)
    assert abs(state["opened_at"] - time.time()) < 1  # Redis's clock, same host here


def test_while_open_nobody_is_allowed_until_the_reopening_time(redis_client):
    b = breaker(redis_client, cooldown=5.0)
    open_breaker(b)
    opened_at = b.state()["opened_at"]
    for _ in range(3):
        gate = b.allow()
        assert not gate.allowed and not gate.probe
        # Seconds until the reopening time, by Redis's clock (the same host's here).
        assert gate.retry_in == pytest.approx(opened_at + 5.0 - time.time(), abs=0.1)
    # Late outcomes of calls begun before it opened neither extend nor close it.
    assert b.record_failure(probe=False) is False
    b.record_success(probe=False)
    state = b.state()
    assert state["state"] == "open" and state["opened_at"] == opened_at


def test_exactly_one_of_ten_concurrent_callers_probes_after_the_cooldown(redis_url, redis_client):
    b = breaker(redis_client)
    open_breaker(b)
    time.sleep(0.55)
    assert b.state()["state"] == "half_open"
    gates = at_once(10, redis_url, lambda client: breaker(client).allow())
    probes = [g for g in gates if g.allowed]
    assert len(probes) == 1 and probes[0].probe
    for gate in gates:
        if not gate.allowed:
            assert not gate.probe and 0 < gate.retry_in <= 1.0
    assert b.state()["probing"]


def test_a_successful_probe_closes_it(redis_client):
    b = breaker(redis_client)
    open_breaker(b)
    time.sleep(0.55)
    gate = b.allow()
    assert gate.allowed and gate.probe
    b.record_success(probe=True)
    assert b.state() == {"state": "closed", "failures": 0, "opened_at": None, "reopens_at": None,
                         "cooldown": None, "probing": False}
    assert b.allow() == Gate(True, False, 0.0)
    # Closed again from scratch: the next opening needs the full threshold again.
    assert not b.record_failure(probe=False) and not b.record_failure(probe=False)
    assert b.record_failure(probe=False)
    assert b.state()["cooldown"] == pytest.approx(0.5)


def test_a_failed_probe_reopens_it_with_the_cooldown_doubled_up_to_a_cap(redis_client):
    b = breaker(redis_client)
    open_breaker(b)
    for expected in (1.0, 1.5):  # doubled, then capped at max_cooldown
        time.sleep(max(0.0, b.state()["reopens_at"] - time.time() + 0.02))
        gate = b.allow()
        assert gate.probe
        assert b.record_failure(probe=True) is False  # the opening was reported already
        state = b.state()
        assert state["state"] == "open" and not state["probing"]
        assert state["cooldown"] == pytest.approx(expected)
        assert state["reopens_at"] == pytest.approx(state["opened_at"] + expected)
        assert b.allow().retry_in == pytest.approx(state["reopens_at"] - time.time(), abs=0.1)


def test_a_probe_that_died_frees_its_lock_after_its_ttl(redis_client):
    b = breaker(redis_client, probe_ttl=0.3)
    open_breaker(b)
    time.sleep(0.55)
    assert b.allow().probe  # ...and this caller never reports back
    assert not b.allow().allowed
    time.sleep(0.35)
    assert b.allow().probe


def test_concurrent_failures_report_each_opening_exactly_once(redis_url, redis_client):
    b = breaker(redis_client, threshold=5)
    for _ in range(3):
        results = at_once(8, redis_url,
                          lambda client: [breaker(client, threshold=5).record_failure(probe=False) for _ in range(3)])
        assert sum(r for per_thread in results for r in per_thread) == 1
        assert b.state()["state"] == "open"
        time.sleep(max(0.0, b.state()["reopens_at"] - time.time() + 0.02))
        assert b.allow().probe
        b.record_success(probe=True)
        assert b.state()["state"] == "closed"


def test_the_stub_is_always_closed():
    b = NoBreaker()
    assert b.allow() == Gate(True, False, 0.0)
    assert b.record_failure(probe=False) is False
    b.record_success(probe=False)
    assert b.state()["state"] == "closed"
