"""The retry policy alone (``worker.policy``): retry or not, the delays and the budget, with
no Redis and no Plural. What a delivery writes from it is tested in ``test_outcomes``."""

from __future__ import annotations

import pytest

from plural_cancel.errors import (
    PluralAuthError,
    PluralBadResponse,
    PluralConnectionError,
    PluralRateLimited,
    PluralRequestError,
    PluralServerError,
    PluralTimeout,
    PluralTLSError,
    PluralUnexpectedAnswer,
    TokenUnavailable,
)
from plural_cancel.worker.policy import (
    HOLD_SPREAD,
    THROTTLE_SPREAD,
    THROTTLE_WAIT,
    RetryPolicy,
    backoff,
    retryable,
    unsettled,
)


def policy(jitter: float = 0.5, **overrides) -> RetryPolicy:
    return RetryPolicy(**{"base": 2.0, "cap": 600.0, "budget": 3600.0, "jitter": lambda: jitter, **overrides})


@pytest.mark.parametrize("error, expected", [
    (PluralServerError("x"), True), (PluralRateLimited("x"), True), (PluralTimeout("x"), True),
    (PluralConnectionError("x"), True), (PluralUnexpectedAnswer("x"), True), (TokenUnavailable("x"), True),
    (PluralRequestError("x"), False), (PluralAuthError("x"), False), (PluralTLSError("x"), False),
    (PluralBadResponse("x"), False), (ValueError("x"), False), (None, False),
])
def test_which_errors_are_retried(error, expected):
    assert retryable(error) is expected


@pytest.mark.parametrize("state, error, expected", [
    ("unsettled", None, True),  # a payment in flight
    ("unsettled", PluralBadResponse("unreadable"), True),  # not retryable as an error, yet nothing is known
    ("error", PluralServerError("503"), True),
    ("error", PluralBadResponse("a redirect"), False),
    ("error", PluralTLSError("bad certificate"), False),
    ("succeeded", None, False), ("failed", PluralRequestError("refused"), False),
])
def test_an_attempt_is_tried_again_when_it_settled_nothing_or_its_error_can_mend(state, error, expected):
    assert unsettled(state, error) is expected


def test_endings_pass_through_and_an_error_that_cannot_mend_is_a_rejection():
    p = policy()
    assert p.settle("succeeded", "cancelled", None, attempts=1, throttles=0, budget_left=10).state == "succeeded"
    failed = p.settle("failed", "not_cancellable", None, attempts=1, throttles=0, budget_left=10)
    assert (failed.state, failed.outcome) == ("failed", "not_cancellable")
    rejected = p.settle("error", None, PluralTLSError("x"), attempts=1, throttles=0, budget_left=10)
    assert (rejected.state, rejected.outcome) == ("failed", "rejected")


def test_a_failure_backs_off_exponentially_with_full_jitter_up_to_the_cap():
    assert [backoff(n, base=2, cap=600, jitter=lambda: 0.999999) for n in (1, 2, 3, 4)] == \
        pytest.approx([2, 4, 8, 16], rel=1e-5)
    assert backoff(30, base=2, cap=600, jitter=lambda: 0.5) == 300
    assert backoff(5, base=2, cap=600, jitter=lambda: 0.0) == 0


def test_a_failures_delay_is_never_shorter_than_plurals_retry_after():
    step = policy(jitter=0.0).settle("error", None, PluralServerError("503", retry_after=7.0), attempts=1,
                                     throttles=0, budget_left=100)
    assert (step.state, step.delay, step.throttled) == ("retry", 7.0, False)


def test_a_throttle_waits_its_retry_after_and_grows_no_backoff():
    p = policy(jitter=1.0)
    after_many = p.settle("error", None, PluralRateLimited("429", retry_after=2.0), attempts=9, throttles=8,
                          budget_left=100)
    assert (after_many.state, after_many.throttled) == ("retry", True)
    assert after_many.delay == 2.0 + THROTTLE_SPREAD
    no_hint = p.settle("error", None, PluralRateLimited("429"), attempts=1, throttles=0, budget_left=100)
    assert no_hint.delay == THROTTLE_WAIT + THROTTLE_SPREAD


def test_a_failure_after_throttles_backs_off_by_its_failures_alone():
    p = policy(jitter=0.999999)
    step = p.settle("error", None, PluralServerError("500"), attempts=6, throttles=5, budget_left=1000)
    assert step.delay == pytest.approx(2.0, rel=1e-5)  # the first failure's ceiling, not the sixth's


def test_a_retry_that_would_end_past_the_budget_gives_up():
    p = policy(jitter=0.5)
    step = p.settle("unsettled", None, PluralBadResponse("x"), attempts=3, throttles=0, budget_left=1.0)
    assert (step.state, step.outcome) == ("failed", "gave_up")
    assert p.settle("unsettled", None, None, attempts=3, throttles=0, budget_left=4.0).state == "retry"  # 8 x 0.5


def test_holds_before_any_call():
    p = policy(jitter=0.5)
    assert p.breaker_hold(30.0) == 30.0 + HOLD_SPREAD / 2
    # Back while the free slot is still up to max_wait ahead: never after it.
    assert p.slot_hold(10.0, 2.0) == 8.0 + 1.0
    assert p.slot_hold(0.0, 2.0) == 1.0  # a slot missed: a new one soon
