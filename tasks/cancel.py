"""The cancel task and the one classification of what Plural answered.

The task body follows the path of one cancel: claim the record, call Plural (the
same Request-ID on every attempt), classify the answer, then finish or defer.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from config.celery import lease_seconds
from worker import app, metrics, reporting
from worker.errors import PluralAuthError, PluralError, PluralRateLimited, PluralRequestError
from worker.links import PaymentLink, format_timestamp
from worker.plural import PluralClient
from worker.retry import backoff
from worker.runtime import Runtime
from worker.tokens import TokenUnavailable
from worker.validation import validate_payment_link_id, validate_request_id

log = logging.getLogger(__name__)

# After a refused cancel, the link's own status says what happened (API-NOTES).
DONE_STATUSES = {"CANCELLED": ("succeeded", "already_cancelled")}
FINAL_STATUSES = {"PROCESSED", "PARTIAL_PROCESSED", "EXPIRED"}
IN_FLIGHT_STATUSES = {"PAYMENT_INITIATED"}

PROBE_MAX_WAIT = 10.0
"""Seconds the breaker's probe may wait for a rate-limit slot."""

SPREAD = 2.0
"""Seconds over which cancels held back together (limiter, breaker) are spread on return."""


@dataclass(frozen=True)
class Decision:
    """What one attempt came to: ``succeeded``/``failed`` with an outcome, or ``retry``."""

    state: str
    outcome: str | None = None
    link: PaymentLink | None = None
    error: PluralError | Exception | None = None
    retry_after: float | None = None
    """Seconds Plural asked us to wait, for ``retry``."""


def attempt(client: PluralClient, payment_link_id: str, request_id: str) -> Decision:
    """Call Plural once for this cancel (plus a GET when the answer is unclear) and classify."""
    try:
        with metrics.plural_call("cancel"):
            link = client.cancel_payment_link(payment_link_id, request_id)
    except PluralAuthError as exc:  # the client already dropped the token and tried once more
        return Decision("failed", "auth_failed", error=exc)
    except PluralRequestError as exc:
        return decide_from_link(client, payment_link_id, exc)
    except PluralError as exc:
        return _retry_or_reject(exc)
    except TokenUnavailable as exc:
        return Decision("retry", error=exc)
    if link.status == "CANCELLED":
        return Decision("succeeded", "cancelled", link=link)
    return _from_status(link, None)


def decide_from_link(client: PluralClient, payment_link_id: str, refusal: PluralRequestError) -> Decision:
    """Plural refused the cancel with a 4xx: ``GET`` the link and let its status decide."""
    try:
        # A fresh Request-ID: the cancel's own id belongs to the PUT it identifies.
        with metrics.plural_call("get"):
            link = client.get_payment_link(payment_link_id, request_id=str(uuid.uuid4()))
    except PluralAuthError as exc:
        return Decision("failed", "auth_failed", error=exc)
    except PluralRequestError:
        # Unknown link, or a request Plural calls invalid: nothing to cancel.
        return Decision("failed", "rejected", error=refusal)
    except PluralError as exc:
        return _retry_or_reject(exc)
    except TokenUnavailable as exc:
        return Decision("retry", error=exc)
    return _from_status(link, refusal)


def _from_status(link: PaymentLink, refusal: PluralError | None) -> Decision:
    if link.status in DONE_STATUSES:
        state, outcome = DONE_STATUSES[link.status]
        return Decision(state, outcome, link=link)
    if link.status in FINAL_STATUSES:
        return Decision("failed", "not_cancellable", link=link, error=refusal)
    if link.status in IN_FLIGHT_STATUSES:
        # A payment is in flight: it may fail (cancel then) or succeed (not_cancellable then).
        return Decision("retry", link=link, error=refusal)
    return Decision("failed", "rejected", link=link, error=refusal)


def _retry_or_reject(exc: PluralError) -> Decision:
    if exc.retryable:
        return Decision("retry", error=exc, retry_after=exc.retry_after)
    return Decision("failed", "rejected", error=exc)


def error_summary(error: PluralError | Exception | None) -> dict | None:
    """What a status record keeps of an error: status, Plural's code, its message; no secrets."""
    if error is None:
        return None
    if isinstance(error, PluralError):
        return error.as_dict()
    return {"http_status": None, "code": type(error).__name__, "message": str(error)[:300]}


def execute(rt: Runtime, payment_link_id: str, request_id: str) -> str:
    """Run one delivery of one cancel; returns what became of it (for logs and tests)."""
    ledger = rt.ledger
    owner = uuid.uuid4().hex
    admitted = rt.attempts.admit(request_id, payment_link_id, owner, lease_seconds(rt.settings),
                                 max_wait=rt.settings.limiter_max_wait, probe_max_wait=PROBE_MAX_WAIT)
    claim = admitted.claim
    if claim.verdict == "busy":
        # Another delivery holds the link: come back when its lock runs out, in case it died.
        ledger.park(request_id, rt.clock() + claim.wait + 1.0)
        return "busy"
    if claim.verdict != "claimed":
        if claim.verdict == "mismatch":
            log.error("message names another link than its record; dropped",
                      extra={"request_id": request_id, "payment_link_id": payment_link_id})
        return claim.verdict
    ids = {"request_id": request_id, "payment_link_id": payment_link_id, "attempts": claim.attempts}
    if admitted.gate is None:  # claimed, but past its deadline: the breaker was not even asked
        ledger.finish(request_id, payment_link_id, owner, state="failed", outcome="gave_up", attempted=False)
        last = ledger.status(request_id) or {}
        log.warning("cancel failed: gave_up (retry budget spent)",
                    extra={**ids, "state": "failed", "outcome": "gave_up", "error": last.get("last_error")})
        report_failed(request_id, payment_link_id, "gave_up", claim.attempts, last.get("last_error"),
                      last.get("link_status"))
        return "gave_up"
    log.debug("cancel running", extra={**ids, "state": "running"})
    waiting = "retrying" if claim.attempts else "queued"  # the state a hold before any call leaves

    gate = admitted.gate
    if not gate.allowed:
        # Plural is down: wait for the reopening time without spending an attempt.
        ledger.defer(request_id, payment_link_id, owner, due=_spread(rt, gate.retry_at), attempted=False)
        log.info("cancel held: the circuit breaker is open", extra={**ids, "state": waiting, "reason": "breaker"})
        metrics.DEFERRALS.labels("breaker").inc()
        return "held"
    max_wait = PROBE_MAX_WAIT if gate.probe else rt.settings.limiter_max_wait
    slot = admitted.slot
    if not slot.granted:
        # Come back while the free slot is still up to ``max_wait`` ahead, so that a slot
        # is reserved ahead of its time and none goes unused: the drain stays at the limit.
        due = rt.clock() + max(0.0, slot.wait - max_wait) + max_wait * rt.jitter()
        ledger.defer(request_id, payment_link_id, owner, due=due,
                     attempted=False)
        log.info("cancel held: rate limit", extra={**ids, "state": waiting, "reason": "rate_limit"})
        metrics.DEFERRALS.labels("rate_limit").inc()
        return "throttled"
    if slot.wait > 0:
        time.sleep(slot.wait)  # the slot is ours from then on
    metrics.LIMITER_WAIT.observe(slot.wait)

    decision = attempt(rt.plural, payment_link_id, request_id)
    success_probe = observe(rt, decision, gate.probe)
    return record(rt, decision, payment_link_id, request_id, owner, attempts=claim.attempts + 1,
                  deadline=claim.deadline, success_probe=success_probe)


def observe(rt: Runtime, decision: Decision, probe: bool) -> bool | None:
    """Tell the breaker and the limiter what Plural's health looked like on this attempt.

    A failure is written at once: whether it opened the breaker decides what is
    reported. A success is left to :func:`record`, which writes it with the outcome in
    one round trip: returns ``probe`` for a success, None for a failure.
    """
    error = decision.error
    if decision.state == "retry" and isinstance(error, PluralError) and error.retryable:
        if isinstance(error, PluralRateLimited):
            rt.limiter.penalize()
        if rt.breaker.record_failure(probe):
            # Reported to Sentry once, with tags, below; the "sentry" extra keeps the
            # logging integration from reporting this line a second time.
            log.error("circuit breaker opened: Plural is failing (%s); cancels are held until it reopens",
                      error.code or type(error).__name__, extra={"sentry": reporting.REPORTED})
            metrics.BREAKER_OPENINGS.inc()
            reporting.report_breaker_opened(code=error.code, http_status=error.http_status,
                                            cooldown=rt.settings.breaker_cooldown)
        return None
    # Any answer that is not a Plural-side failure (including a 4xx) shows Plural is up.
    return probe


def _spread(rt: Runtime, due: float) -> float:
    """``due`` plus up to ``SPREAD`` seconds, so held cancels do not all come back in one instant."""
    return due + SPREAD * rt.jitter()


def record(rt: Runtime, decision: Decision, payment_link_id: str, request_id: str, owner: str, *,
           attempts: int, deadline: float, success_probe: bool | None = None) -> str:
    """Write the decision to the ledger: finish it, or defer it with backoff inside the budget.

    ``success_probe`` not None: Plural answered, and the breaker hears so in the same write.
    """
    writer = rt.attempts
    error = error_summary(decision.error)
    fields = {"request_id": request_id, "payment_link_id": payment_link_id, "attempts": attempts}
    if decision.state == "retry":
        settings = rt.settings
        delay = backoff(attempts, base=settings.retry_base, cap=settings.retry_cap, jitter=rt.jitter,
                        retry_after=decision.retry_after)
        due = rt.clock() + delay
        if due <= deadline:
            writer.defer(request_id, payment_link_id, owner, success_probe=success_probe, due=due,
                         attempted=True, last_error=error)
            log.info("cancel retrying in %.1fs", delay, extra={**fields, "state": "retrying", "error": error})
            metrics.RETRIES.labels(_retry_reason(decision)).inc()
            return "retrying"
        decision = Decision("failed", "gave_up", link=decision.link, error=decision.error)
    link = decision.link
    writer.finish(
        request_id, payment_link_id, owner, success_probe=success_probe, state=decision.state,
        outcome=decision.outcome, attempted=True,
        link_status=link.status if link else None,
        cancelled_at=format_timestamp(link.cancelled_at) if link and link.cancelled_at else None,
        amount={"value": link.amount.value, "currency": link.amount.currency} if link and link.amount else None,
        last_error=error,
    )
    level = logging.INFO if decision.state == "succeeded" else logging.WARNING
    log.log(level, "cancel %s: %s", decision.state, decision.outcome,
            extra={**fields, "state": decision.state, "outcome": decision.outcome, "error": error})
    if decision.state == "failed":
        report_failed(request_id, payment_link_id, decision.outcome, attempts, error, link.status if link else None)
    else:
        metrics.CANCELS.labels(decision.outcome).inc()
    return decision.outcome


def report_failed(request_id: str, payment_link_id: str, outcome: str, attempts: int, error: dict | None,
                  link_status: str | None) -> None:
    """A cancel has just been recorded ``failed``: count it and report it, once.

    Once, because only the delivery holding the claim finishes a record, and a
    finished record is never claimed again.
    """
    metrics.CANCELS.labels(outcome).inc()
    reporting.report_failure(request_id=request_id, payment_link_id=payment_link_id, outcome=outcome,
                             attempts=attempts, error=error, link_status=link_status)


def _retry_reason(decision: Decision) -> str:
    """A bounded label for why an attempt will be retried: the error's class, or the payment in flight."""
    if decision.link is not None and decision.link.status in IN_FLIGHT_STATUSES:
        return "payment_in_flight"
    return type(decision.error).__name__ if decision.error is not None else "unknown"


@app.task(name="tasks.cancel_payment_link", bind=True)
def cancel_payment_link(self, payment_link_id: str, request_id: str) -> str:
    """Cancel one Plural payment link; ``request_id`` is the idempotency key of this cancel.

    Sent by name (``send_task("tasks.cancel_payment_link", kwargs=...)``) from any
    service; creates the status record when the sender did not.
    """
    try:
        validate_payment_link_id(payment_link_id)
        validate_request_id(request_id)
    except ValueError as exc:
        # Retrying cannot fix a malformed message; the sender must.
        log.error("cancel message refused: %s", exc)
        return "invalid"
    return execute(self.app.runtime, payment_link_id, request_id)
