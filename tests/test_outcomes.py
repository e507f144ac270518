"""Outcomes decided from facts: what one attempt makes of each kind of answer.

Each test runs the cancel task's body (``worker.delivery.execute``) in this process, against
real Redis and a scripted Plural over real HTTP, and reads the status record it wrote.
"""

from __future__ import annotations

import copy
import json
import time

import pytest

from tests.conftest import wait_for
from tests.support.scripted_plural import LINK_ID, SEED_200, Answer

# The seed's example has tabs inside strings, which a strict JSON parser refuses.
SEED = json.loads(SEED_200, strict=False)
CANCELLED = {**SEED, "status": "CANCELLED"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def runtime(redis_url, plural):
    from plural_cancel.config.settings import Settings
    from plural_cancel.worker.runtime import Runtime

    settings = Settings.from_env({"REDIS_URL": redis_url, "PLURAL_BASE_URL": plural.base_url,
                                  "PLURAL_CLIENT_ID": "client-7f3a", "PLURAL_CLIENT_SECRET": "s3cr3t-DO-NOT-LEAK-91c2",
                                  "CANCEL_RETRY_BASE": "1", "CANCEL_RETRY_CAP": "1"})
    rt = Runtime(settings, jitter=lambda: 0.5)
    yield rt
    rt.close()


def run(runtime, request_id: str = "req-outcome", link_id: str = LINK_ID, *, keep_late: bool = False) -> dict:
    """One delivery of the cancel; again if it gave up its rate-limit slot ("late": a first
    call whose token fetch, on a busy machine, took longer than ``SLOT_LATENESS``), since
    these tests are about what an answer makes of the cancel. ``keep_late``: never again."""
    from plural_cancel.worker.delivery import execute

    runtime.ledger.create_many([(request_id, link_id)])
    given_up_until = time.monotonic() + 15
    # A slot given up leaves the cancel due again within a second ("early" until then).
    while execute(runtime, link_id, request_id) in ("late", "early") and not keep_late \
            and time.monotonic() < given_up_until:
        time.sleep(0.05)
    return runtime.ledger.status(request_id)


def link_with(**changes) -> dict:
    link = copy.deepcopy(CANCELLED)
    for path, value in changes.items():
        where = link
        *parents, last = path.split("__")
        for name in parents:
            where = where[name]
        where[last] = value
    return link


@pytest.mark.parametrize("body", [
    link_with(customer__mobile_number=9876543210.0),
    link_with(expire_by="21/03/2025 08:29"),
    link_with(amount={"value": "50000", "currency": "INR"}, product_details="none"),
], ids=["float-mobile-number", "non-iso-expire-by", "odd-amount-and-products"])
def test_a_cancelled_link_with_odd_fields_is_cancelled_without_a_get(runtime, plural, body):
    plural.answers.append(Answer(200, body, JSON))
    status = run(runtime)
    assert (status["state"], status["outcome"], status["link_status"]) == ("succeeded", "cancelled", "CANCELLED")
    assert [s.method for s in plural.calls()] == ["PUT"]
    assert status["last_error"] is None


@pytest.mark.parametrize("answer", [
    Answer(200, ""),
    Answer(204),
    Answer(200, "<html><body>OK</body></html>", {"Content-Type": "text/html"}),
    Answer(200, {"result": "ok"}, JSON),
], ids=["empty-200", "204", "html-200", "json-without-status"])
def test_an_unreadable_success_is_decided_by_the_links_status(runtime, plural, answer):
    plural.answers.extend([answer, Answer(200, CANCELLED, JSON)])
    status = run(runtime)
    assert (status["state"], status["outcome"], status["link_status"]) == ("succeeded", "cancelled", "CANCELLED")
    assert [s.method for s in plural.calls()] == ["PUT", "GET"]


def test_an_unreadable_success_of_a_paid_link_is_not_cancellable(runtime, plural):
    plural.answers.extend([Answer(204), Answer(200, {**SEED, "status": "PROCESSED"}, JSON)])
    status = run(runtime)
    assert (status["state"], status["outcome"], status["link_status"]) == ("failed", "not_cancellable", "PROCESSED")


@pytest.mark.parametrize("answers, why", [
    ([Answer(200, "<html><body>Welcome</body></html>", {"Content-Type": "text/html"}),
      Answer(200, {**SEED, "status": "CREATED"}, JSON)], "could not be read"),  # and the GET's
    ([Answer(200, {**SEED, "status": "CREATED"}, JSON)], "said it succeeded"),
], ids=["a-proxys-html-200", "a-200-whose-link-is-open"])
def test_a_success_whose_link_is_still_open_is_sent_again_not_rejected(runtime, plural, answers, why):
    """A proxy answered the PUT with its own 200 (the PUT never reached Plural) and the GET
    shows the link open: nothing refused the cancel, so it is retried, same Request-ID."""
    plural.answers.extend(answers)
    status = run(runtime)
    assert (status["state"], status["outcome"], status["attempts"]) == ("retrying", None, 1)
    assert why in status["last_error"]["message"] and "still CREATED" in status["last_error"]["message"]
    assert status["last_error"]["http_status"] == 200
    # The retry (due in half a second) carries the same Request-ID and ends the cancel.
    plural.answers.append(Answer(200, CANCELLED, JSON))
    assert (run(runtime)["state"], run(runtime)["outcome"]) == ("succeeded", "cancelled")
    puts = plural.calls("/cancel")
    assert len(puts) == 2 and len({p.headers["Request-ID"] for p in puts}) == 1


def test_an_unreadable_success_and_an_unreadable_link_are_retried(runtime, plural):
    plural.answers.extend([Answer(204), Answer(200, "<html>maintenance</html>", {"Content-Type": "text/html"})])
    status = run(runtime)
    assert (status["state"], status["attempts"]) == ("retrying", 1)
    assert status["last_error"]["code"] == "PluralBadResponse"


def test_a_token_that_could_not_be_had_is_not_an_attempt_and_no_news_of_plural(runtime, plural, redis_client):
    """Another process holds the token lock and never produces a token: the cancel waits,
    uncounted, and the breaker hears nothing."""
    from plural_cancel.worker.plural import PluralClient
    from plural_cancel.worker.tokens import RedisTokenCache

    settings = runtime.settings
    tokens = RedisTokenCache(runtime.redis, settings.client_id, settings.client_secret.reveal(),
                             keys=runtime.keys, wait_timeout=0.3)
    runtime.lane("default").plural = PluralClient.from_settings(settings, tokens=tokens)  # a short wait, for the test
    redis_client.set(runtime.keys.token_lock(settings.client_id), "another-process", px=60_000)
    status = run(runtime)
    assert (status["state"], status["attempts"]) == ("queued", 0)
    assert status["last_error"]["code"] == "TokenUnavailable"
    assert plural.seen == []
    assert runtime.breaker.state()["links_called"] == 0  # the breaker heard nothing


def test_a_put_that_would_leave_late_for_its_rate_limit_slot_is_not_sent(runtime, plural):
    """The token took longer than the slot's lateness allows (as a stalled process would):
    the PUT is not sent, so calls bunched behind a stall never crowd Plural's second; the
    cancel is not an attempt, the breaker hears nothing, and it takes a new slot later."""
    from plural_cancel.worker.delivery import SLOT_LATENESS, execute

    plural.token_answers.append(Answer(200, {"access_token": "tkn-slow", "expires_at": "2099-01-01T00:00:00Z"},
                                       delay=SLOT_LATENESS + 0.2))
    from prometheus_client import REGISTRY

    def cancel_calls() -> float:
        return REGISTRY.get_sample_value("plural_cancel_plural_request_seconds_count", {"call": "cancel"}) or 0.0

    before = cancel_calls()
    status = run(runtime, keep_late=True)
    assert cancel_calls() == before  # nothing was sent: not a call to Plural in the metrics
    assert (status["state"], status["attempts"]) == ("queued", 0)
    assert status["next_attempt_at"] is not None
    assert [seen.path for seen in plural.seen] == ["/api/auth/v1/token"]  # the token, then no PUT
    assert runtime.breaker.state()["links_called"] == 0
    plural.answers.append(Answer(200, CANCELLED, JSON))
    # Due again within a second; the token is had now, so the next slot is kept.
    wait_for(lambda: execute(runtime, LINK_ID, "req-outcome") == "cancelled", 5, 0.1, "the cancel on a new slot")


def test_plurals_message_is_masked_before_it_is_stored(runtime, plural, redis_client):
    """Plural's own error message can quote what it was sent; the record keeps it masked."""
    message = "mobile 9876543210 of priya.sharma@example.com is invalid; token=abcdef123456"
    plural.answers.extend([Answer(400, {"code": "INVALID_REQUEST", "message": message}, JSON),
                           Answer(404, {"code": "NOT_FOUND", "message": "link not found"}, JSON)])
    status = run(runtime)
    assert (status["state"], status["outcome"]) == ("failed", "rejected")
    stored = json.dumps(status["last_error"])
    for secret in ("9876543210", "priya.sharma@example.com", "abcdef123456"):
        assert secret not in stored
    assert "[email]" in stored and "[phone]" in stored
    for key in redis_client.scan_iter("*"):
        if redis_client.type(key) == b"hash":
            assert b"priya.sharma" not in b"".join(redis_client.hgetall(key).values())


def test_a_cancel_that_could_not_reach_plural_is_not_an_attempt(runtime, plural):
    """Plural's host refuses connections: the PUT never left, so the cancel is retried
    without counting an attempt, and the breaker hears of a failure (Plural is unreachable)."""
    plural.token_answers.append(Answer(200, {"access_token": "tkn-long-lived", "expires_at": "2099-01-01T00:00:00Z"}))
    plural.answers.append(Answer(200, CANCELLED, JSON))
    assert run(runtime, "req-first")["outcome"] == "cancelled"  # a token is cached, the pool warm
    plural.close()  # nothing listens on Plural's port any more...
    runtime.lane("default").plural.close()  # ...and the kept-alive connection is gone with it
    status = run(runtime, "req-unreachable")
    assert (status["state"], status["attempts"]) == ("queued", 0)  # never attempted
    assert status["last_error"]["code"] == "PluralConnectionError"
    assert "PUT" in status["last_error"]["message"]  # the cached token was used: the PUT itself failed
    assert runtime.breaker.state()["links_failing"] == 1


def test_a_token_endpoint_that_cannot_be_reached_is_not_an_attempt(runtime, plural):
    plural.close()
    status = run(runtime)
    assert (status["state"], status["attempts"]) == ("queued", 0)  # never attempted
    assert "Generate Token" in status["last_error"]["message"]


def test_a_waf_page_on_every_link_is_retried_and_reported_once_as_an_outage(runtime, plural, caplog):
    """A 403 that is not Plural's word (a firewall's HTML page) is no refusal: each cancel is
    retried, and when it lasts across links the breaker opens, which is reported once."""
    import logging

    html = Answer(403, "<html><body>Request blocked</body></html>", {"Content-Type": "text/html"})
    caplog.set_level(logging.ERROR, logger="plural_cancel.tasks.cancel")
    statuses = []
    for n in range(runtime.settings.breaker_min_links + 2):
        plural.answers.append(html)
        statuses.append(run(runtime, f"req-waf-{n}", f"pl-waf-{n}"))
    assert {(s["state"], s["last_error"]["http_status"]) for s in statuses[:5]} == {("retrying", 403)}
    assert runtime.breaker.state()["state"] == "open"
    assert [s["attempts"] for s in statuses[5:]] == [0, 0]  # held by the breaker, not sent
    assert len([r for r in caplog.records if "circuit breaker opened" in r.getMessage()]) == 1
    assert len(plural.calls("/cancel")) == 5


def test_an_unreadable_success_and_a_refused_get_are_retried_not_rejected(runtime, plural):
    plural.answers.extend([Answer(204), Answer(404, {"code": "NOT_FOUND", "message": "no such link"}, JSON)])
    status = run(runtime)
    assert (status["state"], status["attempts"]) == ("retrying", 1)
    assert status["last_error"]["http_status"] == 404 and "took the cancel" in status["last_error"]["message"]


@pytest.mark.parametrize("answer", [
    Answer(400, {"code": "PAYMENT_RATE_LIMIT", "message": "Too many requests"}, JSON),
    Answer(422, {"code": "RATE_LIMITED", "message": "slow down"}, JSON),
    Answer(429, {"code": "TOO_MANY", "message": "slow down"}, {**JSON, "Retry-After": "2"}),
], ids=["400-PAYMENT_RATE_LIMIT", "422-RATE_LIMITED", "429"])
def test_a_throttle_in_any_words_is_retried_after_its_wait_never_a_refusal(runtime, plural, answer):
    """Plural's "slower", whether a 429 or a 4xx whose code names a rate limit: the same
    Request-ID again after its Retry-After (a second without one), no GET, no backoff grown."""
    plural.answers.append(answer)
    status = run(runtime)
    assert (status["state"], status["outcome"], status["attempts"]) == ("retrying", None, 1)
    assert status["last_error"]["code"] == answer.body["code"]
    assert [s.method for s in plural.calls()] == ["PUT"]  # no GET: "slower" says nothing of the link
    record = runtime.redis.hgetall(runtime.keys.record("req-outcome"))
    assert record[b"throttles"] == b"1"
    wait = float(record[b"next_attempt_at"]) - float(record[b"updated_at"])
    retry_after = float(answer.headers.get("Retry-After", 1))
    assert retry_after <= wait <= retry_after + 0.5  # its own wait, plus a little spread
    pace = runtime.redis.hgetall(runtime.limiter.pace_key)
    assert float(pace[b"throttled"]) == 1.0  # counted in the throttled share
    time.sleep(wait)
    plural.answers.append(Answer(200, CANCELLED, JSON))
    assert (run(runtime)["state"], run(runtime)["outcome"]) == ("succeeded", "cancelled")
    assert len({c.headers["Request-ID"] for c in plural.calls("/cancel")}) == 1


def test_a_failure_after_throttles_backs_off_by_its_failures_alone(runtime, plural):
    """Three throttles, then a 503: its backoff is a first failure's (CANCEL_RETRY_BASE 1 s,
    jitter 0.5 here: 0.5 s), not a fourth attempt's."""
    for _ in range(3):
        plural.answers.append(Answer(429, {"code": "X", "message": "slow"}, {**JSON, "Retry-After": "0"}))
        run(runtime)
    plural.answers.append(Answer(503, {"code": "INTERNAL_ERROR", "message": "down"}, JSON))
    status = run(runtime)
    record = runtime.redis.hgetall(runtime.keys.record("req-outcome"))
    assert (status["attempts"], record[b"throttles"]) == (4, b"3")
    assert float(record[b"next_attempt_at"]) - float(record[b"updated_at"]) == pytest.approx(0.5, abs=0.01)
