"""The shared circuit breaker: opens on failures of several links, never on one; holds
calls back; lets one probe test recovery."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from plural_cancel.worker.breaker import FAILURE, NO_NEWS, SUCCESS, Gate, RedisCircuitBreaker
from plural_cancel.worker.keys import Keys
from tests.support.scripts import allow, record

KEY = Keys().breaker


def breaker(client: redis.Redis, **kwargs) -> RedisCircuitBreaker:
    options = {"window": 5.0, "min_links": 3, "failure_rate": 0.5, "cooldown": 0.5, "max_cooldown": 1.5,
               "probe_ttl": 5.0}
    options.update(kwargs)
    return RedisCircuitBreaker(client, KEY, **options)


def open_breaker(b: RedisCircuitBreaker) -> None:
    opened = [record(b, FAILURE, f"pl-down-{i}") for i in range(b.min_links)]
    assert opened[-1] and not any(opened[:-1])


def at_once(n: int, redis_url: str, call) -> list:
    """Run ``call(client, i)`` in ``n`` threads released together, each with its own connection."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        client = redis.Redis.from_url(redis_url)
        barrier.wait()
        results[i] = call(client, i)
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_failures_of_enough_distinct_links_open_it(redis_client):
    b = breaker(redis_client)
    assert record(b, FAILURE, "pl-a") is False
    assert record(b, FAILURE, "pl-b") is False
    assert allow(b, "o") == Gate(True, False, 0.0)
    assert record(b, FAILURE, "pl-c") is True  # the third distinct link, all failing
    state = b.state()
    assert state["state"] == "open"
    assert state["reopens_at"] == pytest.approx(state["opened_at"] + 0.5)
    assert abs(state["opened_at"] - time.time()) < 1  # Redis's clock, same host here


@pytest.mark.parametrize("healthy_calls", [0, 1, 10, 1000])
def test_one_poison_link_never_opens_it_at_any_traffic_level(redis_client, healthy_calls):
    """Hundreds of failures of one link, alone or among any number of successes."""
    b = breaker(redis_client, min_links=2)
    for i in range(healthy_calls):
        record(b, SUCCESS, f"pl-ok-{i}")
    assert not any(record(b, FAILURE, "pl-poison") for _ in range(500))
    state = b.state()
    assert state["state"] == "closed" and state["links_failing"] == 1


def test_a_link_that_recovers_no_longer_counts_as_failing(redis_client):
    b = breaker(redis_client)
    record(b, FAILURE, "pl-a")
    record(b, FAILURE, "pl-b")
    record(b, SUCCESS, "pl-a")  # its latest call succeeded
    assert record(b, FAILURE, "pl-c") is False
    assert b.state()["links_failing"] == 2


def test_the_failing_links_must_be_the_given_share_of_the_window(redis_client):
    """Three links failing among seven healthy ones is 30 %: under a 50 % rate it stays closed."""
    b = breaker(redis_client, failure_rate=0.5)
    for i in range(7):
        record(b, SUCCESS, f"pl-ok-{i}")
    assert not any(record(b, FAILURE, f"pl-down-{i}") for i in range(3))
    assert not any(record(b, FAILURE, f"pl-down-{i}") for i in range(3, 6))  # 6 of 13: still under half
    assert record(b, FAILURE, "pl-down-6")  # 7 of 14: half
    assert b.state()["state"] == "open"


def test_failures_older_than_the_window_are_forgotten(redis_client):
    b = breaker(redis_client, window=0.3)
    record(b, FAILURE, "pl-a")
    record(b, FAILURE, "pl-b")
    time.sleep(0.4)
    assert record(b, FAILURE, "pl-c") is False
    assert b.state()["links_failing"] == 1


def test_no_news_neither_counts_nor_opens(redis_client):
    """A 429 or a token never had: not evidence of an outage."""
    b = breaker(redis_client)
    assert not any(record(b, NO_NEWS, f"pl-{i}") for i in range(20))
    assert b.state()["links_called"] == 0 and b.state()["state"] == "closed"


def test_while_open_nobody_is_allowed_until_the_reopening_time(redis_client):
    b = breaker(redis_client, cooldown=5.0)
    open_breaker(b)
    opened_at = b.state()["opened_at"]
    for _ in range(3):
        gate = allow(b, "o")
        assert not gate.allowed and not gate.probe
        # Seconds until the reopening time, by Redis's clock (the same host's here).
        assert gate.retry_in == pytest.approx(opened_at + 5.0 - time.time(), abs=0.1)
    # Late outcomes of calls begun before it opened neither extend nor close it.
    assert record(b, FAILURE, "pl-late") is False
    record(b, SUCCESS, "pl-late-ok")
    state = b.state()
    assert state["state"] == "open" and state["opened_at"] == opened_at


def test_exactly_one_of_ten_concurrent_callers_probes_after_the_cooldown(redis_url, redis_client):
    b = breaker(redis_client)
    open_breaker(b)
    time.sleep(0.55)
    assert b.state()["state"] == "half_open"
    gates = at_once(10, redis_url, lambda client, i: allow(breaker(client), f"owner-{i}"))
    probes = [g for g in gates if g.allowed]
    assert len(probes) == 1 and probes[0].probe
    for gate in gates:
        if not gate.allowed:
            assert not gate.probe and 0 < gate.retry_in <= 1.0
    assert b.state()["probing"]


def test_a_successful_probe_closes_it_and_the_cooldown_starts_again_from_its_base(redis_client):
    b = breaker(redis_client)
    open_breaker(b)
    time.sleep(0.55)
    assert allow(b, "p1").probe
    first = b.state()
    record(b, FAILURE, "pl-probe", probe=True, owner="p1")  # the cooldown doubles to 1 s
    assert b.state()["cooldown"] == pytest.approx(1.0)
    # Opened again, at a new opening time; open since the first, which the alert on a long
    # outage reads (plural_cancel_breaker_open_since_seconds).
    again = b.state()
    assert again["opened_at"] > first["opened_at"] and again["open_since"] == first["open_since"] == first["opened_at"]
    assert again["open_seconds"] >= again["opened_at"] - first["opened_at"]
    time.sleep(max(0.0, b.state()["reopens_at"] - time.time() + 0.02))
    assert allow(b, "p2").probe
    record(b, SUCCESS, "pl-probe", probe=True, owner="p2")
    assert b.state() == {"state": "closed", "opened_at": None, "reopens_at": None, "cooldown": None,
                         "probing": False, "links_called": 0, "links_failing": 0, "open_since": None,
                         "open_seconds": 0.0}
    assert allow(b, "o") == Gate(True, False, 0.0)
    # Closed from scratch: the next opening needs the full evidence again, and its cooldown is the base.
    assert not record(b, FAILURE, "pl-a") and not record(b, FAILURE, "pl-b")
    assert record(b, FAILURE, "pl-c")
    assert b.state()["cooldown"] == pytest.approx(0.5)


def test_a_failed_probe_reopens_it_with_the_cooldown_doubled_up_to_a_cap(redis_client):
    b = breaker(redis_client)
    open_breaker(b)
    for expected in (1.0, 1.5):  # doubled, then capped at max_cooldown
        time.sleep(max(0.0, b.state()["reopens_at"] - time.time() + 0.02))
        assert allow(b, "p").probe
        assert record(b, FAILURE, "pl-probe", probe=True, owner="p") is False  # reported already
        state = b.state()
        assert state["state"] == "open" and not state["probing"]
        assert state["cooldown"] == pytest.approx(expected)
        assert state["reopens_at"] == pytest.approx(state["opened_at"] + expected)
        assert allow(b, "o").retry_in == pytest.approx(state["reopens_at"] - time.time(), abs=0.1)


def test_a_throttled_probe_frees_the_slot_and_changes_nothing_else(redis_client):
    """A probe answered 429 (or held by the limiter) learnt nothing: the next caller probes at
    once, and the cooldown is not doubled."""
    b = breaker(redis_client)
    open_breaker(b)
    time.sleep(0.55)
    assert allow(b, "p1").probe
    assert not allow(b, "p2").allowed  # p1 probes
    record(b, NO_NEWS, "pl-probe", probe=True, owner="someone-else")  # not the holder: no effect
    assert not allow(b, "p2").allowed
    record(b, NO_NEWS, "pl-probe", probe=True, owner="p1")
    state = b.state()
    assert state["state"] == "half_open" and not state["probing"] and state["cooldown"] == pytest.approx(0.5)
    assert allow(b, "p2").probe


def test_a_probe_that_died_frees_its_lock_after_its_ttl(redis_client):
    b = breaker(redis_client, probe_ttl=0.3)
    open_breaker(b)
    time.sleep(0.55)
    assert allow(b, "p1").probe  # ...and this caller never reports back
    assert not allow(b, "p2").allowed
    time.sleep(0.35)
    assert allow(b, "p2").probe


def test_concurrent_failures_report_each_opening_exactly_once(redis_url, redis_client):
    b = breaker(redis_client, min_links=5)
    for round_ in range(3):
        results = at_once(8, redis_url, lambda client, i: [
            record(breaker(client, min_links=5), FAILURE, f"pl-{round_}-{i}-{n}") for n in range(3)])
        assert sum(r for per_thread in results for r in per_thread) == 1
        assert b.state()["state"] == "open"
        time.sleep(max(0.0, b.state()["reopens_at"] - time.time() + 0.02))
        assert allow(b, "p").probe
        record(b, SUCCESS, "pl-probe", probe=True, owner="p")
        assert b.state()["state"] == "closed"


def test_one_link_can_never_be_the_whole_evidence():
    with pytest.raises(ValueError, match="min_links"):
        RedisCircuitBreaker(None, KEY, window=10, min_links=1, failure_rate=0.5, cooldown=30)
