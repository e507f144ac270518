"""The two round trips around an attempt (``worker.attempts``) decide as the separate calls did."""

from __future__ import annotations

import time

import pytest

from worker.attempts import Attempts
from worker.breaker import RedisCircuitBreaker
from worker.keys import Keys
from worker.ledger import Ledger
from worker.ratelimit import RedisRateLimiter

LINK = "pl-attempts-1"
LEASE = 30.0


@pytest.fixture
def parts(redis_client):
    keys = Keys()
    ledger = Ledger(redis_client, result_ttl=3600, retry_budget=600.0, keys=keys)
    breaker = RedisCircuitBreaker(redis_client, keys.breaker, threshold=2, cooldown=0.2)
    limiter = RedisRateLimiter(redis_client, keys.ratelimit, rate=1.0)
    return ledger, breaker, limiter, Attempts(ledger, breaker, limiter)


def admit(attempts, request_id="req-a", owner="owner-1", link=LINK):
    return attempts.admit(request_id, link, owner, LEASE, max_wait=1.0, probe_max_wait=10.0)


def test_a_fresh_cancel_is_claimed_let_through_and_given_a_slot(parts, redis_client):
    ledger, _, limiter, attempts = parts
    assert ledger.create_many([("req-a", LINK)]) == [1]
    admission = admit(attempts)
    assert admission.claim.verdict == "claimed" and admission.claim.attempts == 0
    assert admission.gate == (True, False, 0.0)
    assert admission.slot.granted and admission.slot.wait == 0.0
    assert ledger.status("req-a")["state"] == "running"
    assert redis_client.exists(limiter.key)  # the slot was taken


def test_a_refused_claim_asks_neither_the_breaker_nor_the_limiter(parts, redis_client):
    ledger, _, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    first = admit(attempts)
    redis_client.delete(limiter.key)
    second = admit(attempts, owner="owner-2")  # the link is still held by the first delivery
    assert first.claim.verdict == "claimed"
    assert second.claim.verdict == "busy" and second.gate is None and second.slot is None
    assert not redis_client.exists(limiter.key)  # no slot was spent on it


def test_an_open_breaker_holds_the_cancel_without_taking_a_slot(parts, redis_client):
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    breaker.record_failure(False)
    assert breaker.record_failure(False)  # opened
    admission = admit(attempts)
    assert admission.claim.verdict == "claimed"
    assert not admission.gate.allowed and admission.gate.retry_at > time.time()
    assert admission.slot is None and not redis_client.exists(limiter.key)


def test_the_probe_may_wait_longer_for_its_slot(parts):
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK), ("req-b", "pl-attempts-2")])
    for _ in range(3):  # the next free slot is now about 3 s away
        assert limiter.reserve(max_wait=10).granted
    assert not admit(attempts, "req-b", link="pl-attempts-2").slot.granted  # 3 s > max_wait 1 s
    breaker.record_failure(False)
    breaker.record_failure(False)
    time.sleep(0.3)  # past the cooldown: the next caller probes
    admission = admit(attempts)
    assert admission.gate.allowed and admission.gate.probe
    assert admission.slot.granted and 2.0 < admission.slot.wait <= 10.0


def test_a_cancel_past_its_deadline_is_claimed_and_goes_no_further(parts, redis_client):
    ledger, _, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    redis_client.hset(ledger.keys.record("req-a"), "deadline", repr(time.time() - 1))
    admission = admit(attempts)
    assert admission.claim.verdict == "claimed" and admission.gate is None and admission.slot is None
    assert not redis_client.exists(limiter.key)


def test_settling_writes_the_outcome_and_the_breakers_success_together(parts, redis_client):
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    admit(attempts)
    breaker.record_failure(False)
    assert breaker.state()["failures"] == 1
    assert attempts.finish("req-a", LINK, "owner-1", success_probe=False, state="succeeded", outcome="cancelled",
                           attempted=True, link_status="CANCELLED") == 1
    status = ledger.status("req-a")
    assert (status["state"], status["outcome"], status["link_status"], status["attempts"]) == (
        "succeeded", "cancelled", "CANCELLED", 1)
    assert breaker.state()["failures"] == 0
    assert not redis_client.exists(ledger.keys.link_lock(LINK))
    assert redis_client.xlen(ledger.keys.events) == 1


def test_deferring_without_a_success_leaves_the_breaker_alone(parts, redis_client):
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    admit(attempts)
    breaker.record_failure(False)
    due = time.time() + 60
    assert attempts.defer("req-a", LINK, "owner-1", success_probe=None, due=due, attempted=True,
                          last_error={"http_status": 503, "code": "X", "message": "down"}) == 1
    assert ledger.status("req-a")["state"] == "retrying"
    assert redis_client.zscore(ledger.keys.deferred, "req-a") == pytest.approx(due)
    assert breaker.state()["failures"] == 1


def test_a_successful_probe_closes_the_breaker_when_settled(parts):
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    breaker.record_failure(False)
    breaker.record_failure(False)
    time.sleep(0.3)
    admission = admit(attempts)
    assert admission.gate.probe
    attempts.finish("req-a", LINK, "owner-1", success_probe=True, state="succeeded", outcome="cancelled",
                    attempted=True)
    assert breaker.state()["state"] == "closed"
