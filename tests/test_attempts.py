"""The two round trips around an attempt (``worker.attempts``): the one writer of its result."""

from __future__ import annotations

import time

import pytest

from plural_cancel.config.settings import Settings
from plural_cancel.worker.attempts import Attempts, Health
from plural_cancel.worker.breaker import FAILURE, NO_NEWS, SUCCESS, RedisCircuitBreaker
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ledger import Ledger
from plural_cancel.worker.ratelimit import RedisRateLimiter
from tests.support.scripts import allow, record, reserve

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)

LINK = "pl-attempts-1"
LEASE = 30.0


@pytest.fixture
def parts(redis_client):
    keys = Keys()
    ledger = Ledger(redis_client, result_ttl=3600, stall_timeout=60.0, rate=10.0,
                    queue=QUEUE, keys=keys)
    breaker = RedisCircuitBreaker(redis_client, keys.breaker, window=10, min_links=2, failure_rate=0.5, cooldown=0.2)
    limiter = RedisRateLimiter(redis_client, keys.ratelimit, rate=1.0)
    return ledger, breaker, limiter, Attempts(ledger, breaker, limiter)


def admit(attempts, request_id="req-a", owner="owner-1", link=LINK):
    return attempts.admit(request_id, link, owner, LEASE, budget=600.0, max_wait=1.0, probe_max_wait=10.0)


def test_a_fresh_cancel_is_claimed_let_through_and_given_a_slot(parts, redis_client):
    ledger, _, limiter, attempts = parts
    assert ledger.create_many([("req-a", LINK)]) == [1]
    admission = admit(attempts)
    assert admission.claim.verdict == "claimed" and admission.claim.attempts == 0
    assert admission.claim.budget_left == pytest.approx(600.0, abs=1)  # counted from the first attempt
    assert admission.gate == (True, False, 0.0)
    assert admission.slot.granted and admission.slot.wait == 0.0
    assert ledger.status("req-a")["state"] == "running"
    assert redis_client.exists(limiter.key)  # the slot was taken


def test_a_refused_claim_asks_neither_the_breaker_nor_the_limiter(parts, redis_client):
    ledger, _, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    first = admit(attempts)
    redis_client.delete(limiter.key)
    second = admit(attempts, owner="owner-2")  # a duplicate message while the first holds its lease
    assert first.claim.verdict == "claimed"
    assert second.claim.verdict == "held" and second.gate is None and second.slot is None
    assert not redis_client.exists(limiter.key)  # no slot was spent on it


def test_an_open_breaker_holds_the_cancel_without_taking_a_slot(parts, redis_client):
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    record(breaker, FAILURE, "pl-down-1")
    assert record(breaker, FAILURE, "pl-down-2")  # opened
    admission = admit(attempts)
    assert admission.claim.verdict == "claimed"
    assert not admission.gate.allowed and 0 < admission.gate.retry_in <= 0.2
    assert admission.slot is None and not redis_client.exists(limiter.key)


def test_the_probe_may_wait_longer_for_its_slot(parts):
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK), ("req-b", "pl-attempts-2")])
    for _ in range(3):  # the next free slot is now about 3 s away
        assert reserve(limiter, max_wait=10).granted
    assert not admit(attempts, "req-b", link="pl-attempts-2").slot.granted  # 3 s > max_wait 1 s
    record(breaker, FAILURE, "pl-down-1")
    record(breaker, FAILURE, "pl-down-2")
    time.sleep(0.3)  # past the cooldown: the next caller probes
    admission = admit(attempts)
    assert admission.gate.allowed and admission.gate.probe
    assert admission.slot.granted and 2.0 < admission.slot.wait <= 10.0


def test_a_cancel_past_its_budget_ends_gave_up_in_the_admission(parts, redis_client):
    ledger, _, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    redis_client.hset(ledger.keys.record("req-a"), mapping={
        "deadline": repr(time.time() - 1), "attempts": 3, "link_status": "CREATED",
        "last_error": '{"http_status":503,"code":"INTERNAL_ERROR","message":"down"}'})
    admission = admit(attempts)
    assert admission.claim.verdict == "gave_up" and admission.gate is None and admission.slot is None
    assert admission.claim.attempts == 3 and admission.claim.last_error["http_status"] == 503
    assert admission.claim.link_status == "CREATED"
    status = ledger.status("req-a")
    assert (status["state"], status["outcome"]) == ("failed", "gave_up")
    assert not redis_client.exists(limiter.key)
    assert redis_client.zscore(ledger.keys.due, "req-a") is None


def test_settling_writes_the_outcome_and_the_breakers_success_together(parts, redis_client):
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    admit(attempts)
    record(breaker, FAILURE, LINK)
    assert breaker.state()["links_failing"] == 1
    settled = attempts.finish("req-a", LINK, "owner-1", health=Health(SUCCESS), state="succeeded",
                              outcome="cancelled", attempted=True, link_status="CANCELLED")
    assert settled.attempts == 1 and not settled.stale
    status = ledger.status("req-a")
    assert (status["state"], status["outcome"], status["link_status"], status["attempts"]) == (
        "succeeded", "cancelled", "CANCELLED", 1)
    assert (breaker.state()["links_failing"], breaker.state()["links_called"]) == (0, 1)  # its latest call succeeded
    assert not redis_client.exists(ledger.keys.link(LINK))
    [(_, event)] = redis_client.xrange(ledger.keys.events)
    assert event[b"payment_link_id"] == LINK.encode() and event[b"outcome"] == b"cancelled"


def test_a_429_reaches_the_pace_and_a_failure_the_breaker_in_the_same_write(parts, redis_client):
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK)])
    admitted = admit(attempts)
    settled = attempts.defer("req-a", LINK, "owner-1", delay=60, attempted=True, throttled=True,
                             health=Health(NO_NEWS, called=True, throttled=True, sent_at=admitted.slot.at),
                             last_error={"http_status": 429, "code": "X", "message": "slow"})
    assert settled.attempts == 1 and not settled.opened
    assert breaker.state()["links_called"] == 0  # a throttle is no news for the breaker
    pace = redis_client.hgetall(limiter.pace_key)
    assert (float(pace[b"calls"]), float(pace[b"throttled"])) == (1.0, 1.0)  # counted: one call, throttled
    assert limiter.effective_rate() == limiter.rate  # and one 429 is not a share worth a cut
    assert redis_client.hget(ledger.keys.record("req-a"), "throttles") == b"1"
    for n, link in enumerate(["pl-attempts-2", "pl-attempts-3"]):
        ledger.create_many([(f"req-{n}", link)])
        admit(attempts, f"req-{n}", f"owner-{n}", link)
        settled = attempts.defer(f"req-{n}", link, f"owner-{n}", health=Health(FAILURE), delay=60, attempted=True)
    assert settled.opened  # the second failing link opened it


def test_deferring_writes_the_due_time_by_redis_clock(parts, redis_client):
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    admit(attempts)
    before = float(redis_client.time()[0])
    assert attempts.defer("req-a", LINK, "owner-1", delay=60, attempted=True,
                          last_error={"http_status": 503, "code": "X", "message": "down"}).attempts == 1
    assert ledger.status("req-a")["state"] == "retrying"
    assert before + 59 <= redis_client.zscore(ledger.keys.due, "req-a") <= before + 62
    assert ledger.stats()["deferred"] == 1
    assert breaker.state()["links_called"] == 0  # no news of Plural: the breaker was not told anything


def test_a_successful_probe_closes_the_breaker_when_settled(parts):
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    record(breaker, FAILURE, "pl-down-1")
    record(breaker, FAILURE, "pl-down-2")
    time.sleep(0.3)
    admission = admit(attempts)
    assert admission.gate.probe
    attempts.finish("req-a", LINK, "owner-1", health=Health(SUCCESS, probe=True), state="succeeded",
                    outcome="cancelled", attempted=True)
    assert breaker.state()["state"] == "closed"


def test_a_delivery_whose_lease_ran_out_writes_nothing(parts, redis_client):
    """Fenced on the owner: after B took over, A's late finish and defer change nothing."""
    ledger, breaker, _, attempts = parts
    ledger.create_many([("req-a", LINK)])
    claim = attempts.admit("req-a", LINK, "owner-a", 0.2, budget=600.0, max_wait=1.0, probe_max_wait=1.0).claim
    assert claim.verdict == "claimed"
    time.sleep(0.3)  # A's lease ran out
    assert admit(attempts, owner="owner-b").claim.verdict == "claimed"
    attempts.finish("req-a", LINK, "owner-b", health=Health(SUCCESS), state="succeeded", outcome="cancelled",
                    attempted=True)
    late_finish = attempts.finish("req-a", LINK, "owner-a", health=Health(FAILURE), state="failed",
                                  outcome="rejected", attempted=True)
    late_defer = attempts.defer("req-a", LINK, "owner-a", health=Health(FAILURE), delay=1, attempted=True)
    assert late_finish.stale and late_defer.stale
    status = ledger.status("req-a")
    assert (status["state"], status["outcome"], status["attempts"]) == ("succeeded", "cancelled", 1)
    assert redis_client.zcard(ledger.keys.failed) == 0 and redis_client.xlen(ledger.keys.events) == 1
    assert redis_client.zscore(ledger.keys.due, "req-a") is None
    assert breaker.state()["links_failing"] == 0  # the stale failures were not counted either


def test_a_probe_held_by_the_limiter_frees_the_probe_slot(parts):
    """The probe got no rate-limit slot: its deferral, with no news, lets the next caller probe
    instead of holding the breaker half open until the probe lock's TTL."""
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK), ("req-b", "pl-attempts-2")])
    record(breaker, FAILURE, "pl-down-1")
    record(breaker, FAILURE, "pl-down-2")
    time.sleep(0.3)
    assert admit(attempts).gate.probe
    assert not admit(attempts, "req-b", "owner-2", "pl-attempts-2").gate.allowed  # a probe is out
    attempts.defer("req-a", LINK, "owner-1", health=Health(NO_NEWS, probe=True), delay=5, attempted=False)
    assert not breaker.state()["probing"]
    assert allow(breaker, "owner-3").probe


def test_the_budget_starts_with_the_first_attempt_not_while_held(parts, redis_client):
    """Held by the breaker or the limiter, a cancel has not failed yet: its budget waits for
    the admission that lets its first call go."""
    ledger, breaker, limiter, attempts = parts
    ledger.create_many([("req-a", LINK), ("req-b", "pl-attempts-2")])
    record(breaker, FAILURE, "pl-down-1")
    record(breaker, FAILURE, "pl-down-2")
    assert not admit(attempts).gate.allowed
    attempts.defer("req-a", LINK, "owner-1", delay=0, attempted=False)
    assert redis_client.hget(ledger.keys.record("req-a"), "deadline") is None
    for _ in range(3):
        assert reserve(limiter, max_wait=10).granted  # the next free slot is seconds away
    redis_client.delete(*breaker.keys)  # closed again
    assert not admit(attempts, "req-b", "owner-2", "pl-attempts-2").slot.granted
    assert redis_client.hget(ledger.keys.record("req-b"), "deadline") is None
    redis_client.delete(limiter.key)
    admission = admit(attempts, owner="owner-3")
    assert admission.slot.granted and admission.claim.budget_left == pytest.approx(600.0, abs=1)
    seconds, micros = redis_client.time()
    deadline = float(redis_client.hget(ledger.keys.record("req-a"), "deadline"))
    assert deadline == pytest.approx(seconds + micros / 1e6 + 600.0, abs=1)
