"""What one attempt came to, from Plural's answer alone: no Redis, no retry rule.

:func:`attempt` sends the cancel's PUT (and, when the answer leaves it unclear, a GET of
the link) and says what is known: the link cancelled, not cancellable, refused, still
unsettled (a payment in flight, a success whose link is still open, answers that cannot
be read), or the error of asking. Whether and when an unsettled attempt or an error is
tried again is the retry policy's (``worker.policy``); writing it down is
``worker.attempts``'.

After a refused cancel, the link's own status says what happened (API-NOTES): a link
cancelled before is ``already_cancelled``; a paid or expired one is ``not_cancellable``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from plural_cancel.errors import PluralAuthError, PluralBadResponse, PluralError, PluralRequestError
from plural_cancel.worker import metrics
from plural_cancel.worker.links import PaymentLink

FINAL_STATUSES = frozenset({"PROCESSED", "PARTIAL_PROCESSED", "EXPIRED"})
"""A link in one of these can no longer be cancelled: the cancel ends ``not_cancellable``."""
IN_FLIGHT_STATUSES = frozenset({"PAYMENT_INITIATED"})
"""A payment is in flight: it may fail (the link can be cancelled then) or succeed."""

SUCCEEDED, FAILED, UNSETTLED, ERROR = "succeeded", "failed", "unsettled", "error"
"""The states of a :class:`Decision`: an ending; nothing known yet; the asking failed."""


class Plural(Protocol):
    """The two calls a cancel makes (``worker.plural.PluralClient``'s)."""

    def cancel_payment_link(self, payment_link_id: str, request_id: str) -> PaymentLink: ...

    def get_payment_link(self, payment_link_id: str, request_id: str) -> PaymentLink: ...


@dataclass(frozen=True)
class Decision:
    """What one attempt came to: ``succeeded`` or ``failed`` with an outcome; ``unsettled``
    (nothing is known yet: ``error`` says why, when something was wrong); or ``error`` (the
    asking failed with ``error``)."""

    state: str
    outcome: str | None = None
    link: PaymentLink | None = None
    error: PluralError | Exception | None = None
    attempted: bool = True
    """The PUT may have reached Plural, so it counts as an attempt. False when it certainly
    never left (no token could be had, Plural could not be connected to)."""


def attempt(client: Plural, payment_link_id: str, request_id: str) -> Decision:
    """Call Plural once for this cancel (plus a GET when the answer is unclear) and say what
    it came to."""
    try:
        with metrics.plural_call("cancel"):
            link = client.cancel_payment_link(payment_link_id, request_id)
    except PluralAuthError as exc:  # the client already dropped the token and tried once more
        return Decision(FAILED, "auth_failed", error=exc, attempted=sent(exc))
    except PluralRequestError as exc:
        return decide_from_link(client, payment_link_id, exc)
    except PluralBadResponse as exc:
        if exc.http_status is not None and 200 <= exc.http_status < 300:
            # A success we cannot read (empty, a 204, HTML, a link without a status): the
            # link's own status says whether it is cancelled.
            return decide_from_link(client, payment_link_id, None, unreadable=exc)
        return Decision(ERROR, error=exc, attempted=sent(exc))
    except PluralError as exc:  # TokenUnavailable too: never sent
        return Decision(ERROR, error=exc, attempted=sent(exc))
    return from_status(link, None)


def sent(error: BaseException) -> bool:
    """Whether the call that raised ``error`` may have reached Plural (``PluralError.sent``;
    ``TokenUnavailable``: no call was made)."""
    return isinstance(error, PluralError) and error.sent


def decide_from_link(client: Plural, payment_link_id: str, refusal: PluralRequestError | None, *,
                     unreadable: PluralBadResponse | None = None) -> Decision:
    """The PUT was refused in Plural's words (``refusal``), or it succeeded unreadably (None,
    with the ``unreadable`` answer): ``GET`` the link and let its status decide. The PUT was
    sent: this is an attempt, whatever became of the GET."""
    try:
        # A fresh Request-ID: the cancel's own id belongs to the PUT it identifies.
        with metrics.plural_call("get"):
            link = client.get_payment_link(payment_link_id, request_id=str(uuid.uuid4()))
    except PluralAuthError as exc:
        return Decision(FAILED, "auth_failed", error=exc)
    except PluralRequestError as exc:
        if refusal is None:
            # Plural took the cancel (a 2xx) and now refuses to show the link: nothing is
            # known yet, which is not a refusal.
            return Decision(UNSETTLED, error=PluralBadResponse(
                f"Plural took the cancel but refused the link's GET: {exc.message}",
                http_status=exc.http_status, code=exc.code, request_id=exc.request_id))
        # Unknown link, or a request Plural calls invalid: nothing to cancel.
        return Decision(FAILED, "rejected", error=refusal)
    except PluralBadResponse as exc:
        # Neither answer can be read: nothing is known yet.
        return Decision(UNSETTLED, error=exc)
    except PluralError as exc:
        return Decision(ERROR, error=exc)
    return from_status(link, refusal, unreadable)


def from_status(link: PaymentLink, refusal: PluralError | None,
                unreadable: PluralBadResponse | None = None) -> Decision:
    """What the link's status says of a cancel Plural took (``refusal`` None) or refused."""
    if link.status == "CANCELLED":
        # Cancelled by this PUT (it succeeded), or before it (it was refused).
        return Decision(SUCCEEDED, "already_cancelled" if refusal else "cancelled", link=link)
    if link.status in FINAL_STATUSES:
        return Decision(FAILED, "not_cancellable", link=link, error=refusal)
    if link.status in IN_FLIGHT_STATUSES:
        # A payment is in flight: it may fail (cancel then) or succeed (not_cancellable then).
        return Decision(UNSETTLED, link=link, error=refusal)
    if refusal is None:
        # A success, and yet the link is still open: the answer was not Plural's (a proxy or a
        # captive portal answering 200 in its place: the PUT never reached Plural), or Plural
        # has not applied it yet. Nothing refused the cancel.
        answer = f"could not be read ({unreadable.message})" if unreadable else "said it succeeded"
        return Decision(UNSETTLED, link=link, error=PluralBadResponse(
            f"the answer to the cancel {answer}, and the link is still {link.status or 'open'}: sent again",
            http_status=unreadable.http_status if unreadable else 200,
            request_id=unreadable.request_id if unreadable else None))
    return Decision(FAILED, "rejected", link=link, error=refusal)


def error_summary(error: PluralError | Exception | None) -> dict | None:
    """What a status record keeps of an error: status, Plural's code, its message; no secrets."""
    if error is None:
        return None
    if isinstance(error, PluralError):
        return error.as_dict()
    return {"http_status": None, "code": type(error).__name__, "message": str(error)[:300]}


def retry_reason(decision: Decision) -> str:
    """A bounded label for why an attempt will be tried again: the error's class, or the payment in flight."""
    if decision.link is not None and decision.link.status in IN_FLIGHT_STATUSES:
        return "payment_in_flight"
    return type(decision.error).__name__ if decision.error is not None else "unknown"
