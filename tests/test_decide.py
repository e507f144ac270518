"""What an attempt came to, from Plural's answer alone (``worker.decide``): no Redis, and a
Plural played by an object that answers or raises as the real client does.

What a delivery then writes is tested against real Redis and HTTP in ``test_outcomes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from plural_cancel.errors import (
    PluralAuthError,
    PluralBadResponse,
    PluralRateLimited,
    PluralRequestError,
    PluralServerError,
    PluralTimeout,
    PluralTLSError,
    TokenUnavailable,
)
from plural_cancel.worker.decide import ERROR, FAILED, SUCCEEDED, UNSETTLED, attempt, error_summary, retry_reason
from plural_cancel.worker.links import PaymentLink

LINK = "pl-decide-1"


@dataclass
class Plural:
    """Answers the PUT with ``put`` and the GET with ``get``: a status (a link with it), or an error raised."""

    put: str | Exception
    get: str | Exception | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)

    def cancel_payment_link(self, payment_link_id: str, request_id: str) -> PaymentLink:
        self.calls.append(("PUT", request_id))
        return self._answer(self.put)

    def get_payment_link(self, payment_link_id: str, request_id: str) -> PaymentLink:
        self.calls.append(("GET", request_id))
        return self._answer(self.get)

    @staticmethod
    def _answer(answer):
        if isinstance(answer, Exception):
            raise answer
        return PaymentLink(status=answer, payment_link_id=LINK)


REFUSED = PluralRequestError("link cannot be cancelled", http_status=400, code="INVALID_REQUEST")
UNREADABLE = PluralBadResponse("the body is not JSON", http_status=200)


@pytest.mark.parametrize("plural, state, outcome", [
    (Plural("CANCELLED"), SUCCEEDED, "cancelled"),
    (Plural(REFUSED, "CANCELLED"), SUCCEEDED, "already_cancelled"),
    (Plural(REFUSED, "PROCESSED"), FAILED, "not_cancellable"),
    (Plural(REFUSED, "EXPIRED"), FAILED, "not_cancellable"),
    (Plural(REFUSED, "CREATED"), FAILED, "rejected"),
    (Plural(REFUSED, PluralRequestError("no such link", http_status=404, code="NOT_FOUND")), FAILED, "rejected"),
    (Plural(UNREADABLE, "CANCELLED"), SUCCEEDED, "cancelled"),
    (Plural(UNREADABLE, "PROCESSED"), FAILED, "not_cancellable"),
    (Plural(PluralAuthError("refused twice", http_status=401)), FAILED, "auth_failed"),
    (Plural(REFUSED, PluralAuthError("refused twice", http_status=401)), FAILED, "auth_failed"),
], ids=["cancelled", "refused-already-cancelled", "refused-paid", "refused-expired", "refused-open",
        "refused-unknown-link", "unreadable-cancelled", "unreadable-paid", "auth", "auth-on-the-get"])
def test_an_answer_that_settles_the_cancel(plural, state, outcome):
    decision = attempt(plural, LINK, "req-1")
    assert (decision.state, decision.outcome, decision.attempted) == (state, outcome, True)


def test_the_get_carries_a_request_id_of_its_own():
    plural = Plural(REFUSED, "CANCELLED")
    attempt(plural, LINK, "req-own")
    [(put, put_id), (get, get_id)] = plural.calls
    assert (put, put_id, get) == ("PUT", "req-own", "GET") and get_id != "req-own"


@pytest.mark.parametrize("plural, why", [
    (Plural(REFUSED, "PAYMENT_INITIATED"), "a payment in flight"),
    (Plural("PAYMENT_INITIATED"), "a payment in flight after a success"),
    (Plural("CREATED"), "a success whose link is still open (not Plural's answer)"),
    (Plural(UNREADABLE, "ACTIVE"), "an unreadable success whose link is still open"),
    (Plural(UNREADABLE, PluralBadResponse("not JSON either")), "neither answer readable"),
    (Plural(UNREADABLE, PluralRequestError("forbidden", http_status=403, code="FORBIDDEN")),
     "a success whose link Plural will not show"),
])
def test_an_answer_that_settles_nothing_is_unsettled_never_a_refusal(plural, why):
    decision = attempt(plural, LINK, "req-1")
    assert decision.state == UNSETTLED and decision.outcome is None, why


def test_a_success_whose_link_is_still_open_says_why_it_goes_again():
    decision = attempt(Plural("CREATED"), LINK, "req-1")
    assert "still CREATED" in decision.error.message and decision.error.http_status == 200


@pytest.mark.parametrize("error, attempted", [
    (PluralServerError("down", http_status=503), True),
    (PluralRateLimited("slower", http_status=429, retry_after=1.0), True),
    (PluralTimeout("no answer"), True),
    (PluralTimeout("connect timed out", sent=False), False),
    (TokenUnavailable("another process holds the refresh"), False),
    (PluralTLSError("bad certificate", sent=False), False),
    (PluralBadResponse("a redirect", http_status=302), True),
])
def test_an_error_of_asking_is_handed_on_with_whether_the_put_left(error, attempted):
    decision = attempt(Plural(error), LINK, "req-1")
    assert (decision.state, decision.error, decision.attempted) == (ERROR, error, attempted)


def test_an_error_on_the_get_after_a_refused_put_is_still_an_attempt():
    decision = attempt(Plural(REFUSED, PluralTimeout("no answer", sent=False)), LINK, "req-1")
    assert (decision.state, decision.attempted) == (ERROR, True)


def test_what_a_record_keeps_of_an_error_and_the_retry_label():
    assert error_summary(None) is None
    assert error_summary(PluralServerError("down", http_status=503, code="INTERNAL_ERROR")) == \
        {"http_status": 503, "code": "INTERNAL_ERROR", "message": "down"}
    assert error_summary(ValueError("x" * 400))["message"] == "x" * 300
    assert retry_reason(attempt(Plural(REFUSED, "PAYMENT_INITIATED"), LINK, "r")) == "payment_in_flight"
    assert retry_reason(attempt(Plural(PluralServerError("down")), LINK, "r")) == "PluralServerError"
