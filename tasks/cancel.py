"""The cancel task and the one classification of what Plural answered.

The task body follows the path of one cancel: claim the record, call Plural (the
same Request-ID on every attempt), classify the answer, then finish or defer.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import redis
from celery.exceptions import Ignore

from plural_cancel.config.celery import CANCEL_TASK, lease_seconds
from plural_cancel.errors import (REDIS_AWAY, MalformedMessage, PluralAuthError, PluralBadResponse,
                                  PluralConnectionError, PluralError, PluralRateLimited, PluralRequestError,
                                  PluralTimeout, SlotMissed, TokenUnavailable, refusal_code, write_refused)
from plural_cancel.worker import app, malformed, metrics, reporting
from plural_cancel.worker.attempts import Health, Settled
from plural_cancel.worker.breaker import FAILURE, NO_NEWS, SUCCESS
from plural_cancel.worker.classify import should_retry
from plural_cancel.worker.links import PaymentLink, format_timestamp
from plural_cancel.worker.plural import PluralClient
from plural_cancel.worker.retry import backoff, throttle_wait
from plural_cancel.worker.runtime import PACING, Runtime
from plural_cancel.worker.validation import validate_payment_link_id, validate_request_id

log = logging.getLogger(__name__)

# After a refused cancel, the link's own status says what happened (API-NOTES).
FINAL_STATUSES = {"PROCESSED", "PARTIAL_PROCESSED", "EXPIRED"}
IN_FLIGHT_STATUSES = {"PAYMENT_INITIATED"}

PROBE_MAX_WAIT = 10.0
"""Seconds the breaker's probe may wait for a rate-limit slot."""

SPREAD = 2.0
"""Seconds over which cancels held back together (limiter, breaker) are spread on return."""

SLOT_LATENESS = 1 / PACING - 1 - 0.006
"""Seconds after its rate-limit slot that a cancel's PUT may still leave (its
``Request-Timestamp``); one that would leave later gives the slot up. The limiter grants
``PACING`` of the limit, so slots are ``1 / (PACING * limit)`` apart, and a 1-s window of
Request-Timestamps holds the slots of ``1 + SLOT_LATENESS + 0.001`` s (the stamp is cut to
the millisecond): under ``1 / PACING`` s, so never more than the limit. The 6 ms spare
cover that millisecond and the slew between the clock that sleeps and the one that stamps."""


@dataclass(frozen=True)
class Decision:
    """What one attempt came to: ``succeeded``/``failed`` with an outcome, or ``retry``."""

    state: str
    outcome: str | None = None
    link: PaymentLink | None = None
    error: PluralError | Exception | None = None
    retry_after: float | None = None
    """Seconds Plural asked us to wait, for ``retry``."""
    attempted: bool = True
    """The PUT may have reached Plural, so it counts as an attempt. False when it certainly
    never left (no token could be had, Plural could not be connected to)."""


def attempt(client: PluralClient, payment_link_id: str, request_id: str) -> Decision:
    """Call Plural once for this cancel (plus a GET when the answer is unclear) and classify."""
    try:
        with metrics.plural_call("cancel"):
            link = client.cancel_payment_link(payment_link_id, request_id)
    except PluralAuthError as exc:  # the client already dropped the token and tried once more
        return Decision("failed", "auth_failed", error=exc, attempted=sent(exc))
    except PluralRequestError as exc:
        return decide_from_link(client, payment_link_id, exc)
    except PluralBadResponse as exc:
        if exc.http_status is not None and 200 <= exc.http_status < 300:
            # A success we cannot read (empty, a 204, HTML, a link without a status): the
            # link's own status says whether it is cancelled.
            return decide_from_link(client, payment_link_id, None, unreadable=exc)
        return _retry_or_reject(exc, attempted=sent(exc))
    except PluralError as exc:  # TokenUnavailable too: retried, never sent
        return _retry_or_reject(exc, attempted=sent(exc))
    return _from_status(link, None)


def sent(error: BaseException) -> bool:
    """Whether the call that raised ``error`` may have reached Plural (``PluralError.sent``;
    ``TokenUnavailable``: no call was made)."""
    return isinstance(error, PluralError) and error.sent


def decide_from_link(client: PluralClient, payment_link_id: str, refusal: PluralRequestError | None, *,
                     unreadable: PluralBadResponse | None = None) -> Decision:
    """The PUT was refused in Plural's words (``refusal``), or it succeeded unreadably (None,
    with the ``unreadable`` answer): ``GET`` the link and let its status decide. The PUT was
    sent: this is an attempt."""
    try:
        # A fresh Request-ID: the cancel's own id belongs to the PUT it identifies.
        with metrics.plural_call("get"):
            link = client.get_payment_link(payment_link_id, request_id=str(uuid.uuid4()))
    except PluralAuthError as exc:
        return Decision("failed", "auth_failed", error=exc)
    except PluralRequestError as exc:
        if refusal is None:
            # Plural took the cancel (a 2xx) and now refuses to show the link: nothing is known
            # yet, so ask again later rather than call it rejected.
            return Decision("retry", error=PluralBadResponse(
                f"Plural took the cancel but refused the link's GET: {exc.message}",
                http_status=exc.http_status, code=exc.code, request_id=exc.request_id))
        # Unknown link, or a request Plural calls invalid: nothing to cancel.
        return Decision("failed", "rejected", error=refusal)
    except PluralBadResponse as exc:
        # Neither answer can be read: nothing is known, so nothing is decided yet.
        return Decision("retry", error=exc, retry_after=exc.retry_after)
    except PluralError as exc:
        return _retry_or_reject(exc, attempted=True)  # whatever became of the GET, the PUT was sent
    return _from_status(link, refusal, unreadable)


def _from_status(link: PaymentLink, refusal: PluralError | None,
                 unreadable: PluralBadResponse | None = None) -> Decision:
    if link.status == "CANCELLED":
        # Cancelled by this PUT (it succeeded), or before it (it was refused).
        return Decision("succeeded", "already_cancelled" if refusal else "cancelled", link=link)
    if link.status in FINAL_STATUSES:
        return Decision("failed", "not_cancellable", link=link, error=refusal)
    if link.status in IN_FLIGHT_STATUSES:
        # A payment is in flight: it may fail (cancel then) or succeed (not_cancellable then).
        return Decision("retry", link=link, error=refusal)
    if refusal is None:
        # A success, and yet the link is still open: the answer was not Plural's (a proxy or a
        # captive portal answering 200 in its place: the PUT never reached Plural), or Plural
        # has not applied it yet. Nothing refused the cancel, so it is sent again, same Request-ID.
        answer = f"could not be read ({unreadable.message})" if unreadable else "said it succeeded"
        return Decision("retry", link=link, error=PluralBadResponse(
            f"the answer to the cancel {answer}, and the link is still {link.status or 'open'}: sent again",
            http_status=unreadable.http_status if unreadable else 200,
            request_id=unreadable.request_id if unreadable else None))
    return Decision("failed", "rejected", link=link, error=refusal)


def _retry_or_reject(exc: PluralError, *, attempted: bool) -> Decision:
    if should_retry(exc):
        return Decision("retry", error=exc, retry_after=exc.retry_after, attempted=attempted)
    return Decision("failed", "rejected", error=exc, attempted=attempted)


def error_summary(error: PluralError | Exception | None) -> dict | None:
    """What a status record keeps of an error: status, Plural's code, its message; no secrets."""
    if error is None:
        return None
    if isinstance(error, PluralError):
        return error.as_dict()
    return {"http_status": None, "code": type(error).__name__, "message": str(error)[:300]}


def execute(rt: Runtime, payment_link_id: str, request_id: str) -> str:
    """Run one delivery of one cancel; returns what became of it (for logs and tests).

    Every write goes through ``rt.attempts``: one round trip when this copy has nothing
    to do (or the budget is spent), two otherwise (``worker.attempts``).
    """
    settings = rt.settings
    owner = uuid.uuid4().hex
    began = time.monotonic()
    probe_max_wait = min(PROBE_MAX_WAIT, settings.attempt_timeout - settings.connect_timeout - settings.read_timeout)
    admitted = rt.attempts.admit(request_id, payment_link_id, owner, lease_seconds(settings),
                                 max_wait=settings.limiter_max_wait, probe_max_wait=probe_max_wait)
    answered = time.monotonic()
    claim = admitted.claim
    ids = {"request_id": request_id, "payment_link_id": payment_link_id, "attempts": claim.attempts}
    if claim.verdict == "gave_up":
        error = claim.last_error
        log.warning("cancel failed: gave_up (retry budget spent)",
                    extra={**ids, "state": "failed", "outcome": "gave_up", "error": error})
        report_failed(request_id, payment_link_id, "gave_up", claim.attempts, error, claim.link_status)
        return "gave_up"
    if claim.verdict == "mismatch":
        # One Request-ID names one cancel: this message's link is not cancelled under it. Not a
        # copy of anything the ledger carries, so it is counted and reported, with both links,
        # for someone to send it under a Request-ID of its own.
        log.error("cancel message refused: request_id %s names the cancel of another link (%s); this link is not "
                  "cancelled (counted as malformed: request_id_conflict)", request_id, claim.link,
                  extra={**ids, "sentry": reporting.REPORTED})
        malformed.count(rt.redis, rt.keys, malformed.REQUEST_ID_CONFLICT)
        reporting.report_request_id_conflict(request_id=request_id, payment_link_id=payment_link_id,
                                             taken_by=claim.link)
        return "conflict"
    if claim.verdict != "claimed":
        # A copy with nothing to do (ended, following, held by another delivery, early):
        # the due index carries the cancel, so this message is simply dropped.
        return claim.verdict
    log.debug("cancel running", extra={**ids, "state": "running"})
    waiting = "retrying" if claim.attempts else "queued"  # the state a hold before any call leaves

    gate = admitted.gate
    if not gate.allowed:
        # Plural is down: wait for the reopening time without spending an attempt.
        if not _accepted(rt, rt.attempts.defer(request_id, payment_link_id, owner,
                                               delay=_spread(rt, gate.retry_in), attempted=False), ids):
            return "stale"
        log.info("cancel held: the circuit breaker is open", extra={**ids, "state": waiting, "reason": "breaker"})
        metrics.DEFERRALS.labels("breaker").inc()
        return "held"
    max_wait = probe_max_wait if gate.probe else settings.limiter_max_wait
    slot = admitted.slot
    if not slot.granted:
        # Come back while the free slot is still up to ``max_wait`` ahead, so that a slot
        # is reserved ahead of its time and none goes unused: the drain stays at the limit.
        delay = max(0.0, slot.wait - max_wait) + max_wait * rt.jitter()
        # A probe that got no slot learnt nothing: its settle frees the probe slot.
        if not _accepted(rt, rt.attempts.defer(request_id, payment_link_id, owner, delay=delay, attempted=False,
                                               health=Health(NO_NEWS, gate.probe)), ids):
            return "stale"
        log.info("cancel held: rate limit", extra={**ids, "state": waiting, "reason": "rate_limit"})
        metrics.DEFERRALS.labels("rate_limit").inc()
        return "throttled"
    # Redis's clock put the slot ``wait`` after it ran the script, which was somewhere between
    # the asking and the answer: sleep from the answer (never early), send by SLOT_LATENESS
    # after the asking (never late, however long the answer took to reach this thread).
    if (sleep := answered + slot.wait - time.monotonic()) > 0:
        time.sleep(sleep)  # the slot is ours from then on
    metrics.LIMITER_WAIT.observe(slot.wait)

    # The attempt's calls share what is left of its bound, so it ends inside its lease.
    try:
        with rt.plural.within(settings.attempt_timeout - (time.monotonic() - began),
                              send_by=began + slot.wait + SLOT_LATENESS):
            decision = attempt(rt.plural, payment_link_id, request_id)
    except SlotMissed:
        # The PUT would have left too late (the process stalled: CPU starvation, a GC pause,
        # a queue for the GIL, a token being fetched), together with those of the slots after
        # it, and crowded Plural's second past the limit. The slot is given up, nothing was
        # sent, and the cancel takes a new one.
        if not _accepted(rt, rt.attempts.defer(request_id, payment_link_id, owner, delay=max_wait * rt.jitter(),
                                               attempted=False, health=Health(NO_NEWS, gate.probe)), ids):
            return "stale"
        log.info("cancel held: late for its rate-limit slot", extra={**ids, "state": waiting, "reason": "rate_limit"})
        metrics.DEFERRALS.labels("rate_limit").inc()
        return "late"
    return record(rt, decision, payment_link_id, request_id, owner,
                  attempts=claim.attempts + int(decision.attempted), throttles=claim.throttles,
                  budget_left=claim.budget_left - (time.monotonic() - began), probe=gate.probe, sent_at=slot.at)


def health(decision: Decision, probe: bool, sent_at: float = 0.0) -> Health:
    """What this attempt showed of Plural's health, for the breaker and the pace (``sent_at``:
    when the call's slot was granted)."""
    error = decision.error
    if isinstance(error, TokenUnavailable):
        return Health(NO_NEWS, probe)  # Plural's token endpoint was never asked: no news of Plural
    # The pace counts the calls Plural answered, and which of them it throttled.
    called = decision.attempted and not isinstance(error, (PluralTimeout, PluralConnectionError))
    if isinstance(error, PluralRateLimited):
        # A throttle, not an outage: the pace hears it; the breaker hears nothing.
        return Health(NO_NEWS, probe, called=called, throttled=True, sent_at=sent_at)
    if decision.state == "retry" and (isinstance(error, PluralBadResponse) or should_retry(error)):
        # A 5xx, no answer, or one that is not Plural's (a maintenance page).
        return Health(FAILURE, probe, called=called, sent_at=sent_at)
    # Any answer that is not a Plural-side failure (including a 4xx in Plural's words) shows Plural is up.
    return Health(SUCCESS, probe, called=called, sent_at=sent_at)


def _spread(rt: Runtime, delay: float) -> float:
    """``delay`` plus up to ``SPREAD`` seconds, so held cancels do not all come back in one instant."""
    return delay + SPREAD * rt.jitter()


def _accepted(rt: Runtime, settled: Settled, ids: dict, error: Exception | None = None) -> bool:
    """Whether the settle was written: False (and a log line) when this delivery's lease ran
    out and another took the cancel over. Reports the breaker's opening when this attempt's
    failure (``error``) opened it: only that one attempt does, so it is reported once."""
    if settled.stale:
        log.warning("cancel result dropped: this delivery's lease ran out and another delivery holds the cancel",
                    extra=ids)
        return False
    if settled.opened:
        code = getattr(error, "code", None)
        # Reported to Sentry once, with tags, below; the "sentry" extra keeps the logging
        # integration from reporting this line a second time.
        log.error("circuit breaker opened: Plural is failing (%s); cancels are held until it reopens",
                  code or type(error).__name__, extra={"sentry": reporting.REPORTED})
        metrics.BREAKER_OPENINGS.inc()
        reporting.report_breaker_opened(code=code, http_status=getattr(error, "http_status", None),
                                        cooldown=rt.settings.breaker_cooldown)
    return True


def record(rt: Runtime, decision: Decision, payment_link_id: str, request_id: str, owner: str, *,
           attempts: int, budget_left: float, throttles: int = 0, probe: bool = False, sent_at: float = 0.0) -> str:
    """Write the decision: finish it, or defer it inside the budget left (seconds), with what
    it showed of Plural's health, in one round trip. A throttle waits Plural's Retry-After
    (``retry.throttle_wait``); a failure backs off by the failed attempts alone (``attempts``
    less the ``throttles`` among them)."""
    writer = rt.attempts
    error = error_summary(decision.error)
    seen = health(decision, probe, sent_at)
    fields = {"request_id": request_id, "payment_link_id": payment_link_id, "attempts": attempts}
    if decision.state == "retry":
        settings = rt.settings
        throttled = isinstance(decision.error, PluralRateLimited)
        if throttled:
            delay = throttle_wait(decision.retry_after, jitter=rt.jitter)
        else:
            delay = backoff(attempts - throttles, base=settings.retry_base, cap=settings.retry_cap,
                            jitter=rt.jitter, retry_after=decision.retry_after)
        if delay <= budget_left:
            settled = writer.defer(request_id, payment_link_id, owner, health=seen, delay=delay,
                                   attempted=decision.attempted, last_error=error,
                                   throttled=throttled and decision.attempted)
            if not _accepted(rt, settled, fields, decision.error):
                return "stale"
            log.info("cancel retrying in %.1fs", delay, extra={**fields, "state": "retrying", "error": error})
            metrics.RETRIES.labels(_retry_reason(decision)).inc()
            return "retrying"
        decision = Decision("failed", "gave_up", link=decision.link, error=decision.error,
                            attempted=decision.attempted)
    link = decision.link
    settled = writer.finish(
        request_id, payment_link_id, owner, health=seen, state=decision.state,
        outcome=decision.outcome, attempted=decision.attempted,
        link_status=link.status if link else None,
        cancelled_at=format_timestamp(link.cancelled_at) if link and link.cancelled_at else None,
        amount={"value": link.amount.value, "currency": link.amount.currency} if link and link.amount else None,
        last_error=error,
    )
    if not _accepted(rt, settled, fields, decision.error):
        return "stale"
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


ARGUMENTS = ("payment_link_id", "request_id")
"""The cancel task's arguments, by keyword (or in this order by position)."""





def parse_arguments(args: tuple, kwargs: dict) -> tuple[str, str]:
    """(payment_link_id, request_id) from a message's arguments, or :class:`MalformedMessage`."""
    if len(args) > len(ARGUMENTS):
        raise MalformedMessage(f"{len(args)} positional arguments; the task takes {', '.join(ARGUMENTS)}")
    given = dict(zip(ARGUMENTS, args))
    twice = sorted(set(given) & set(kwargs))
    unknown = sorted(set(kwargs) - set(ARGUMENTS))
    if twice or unknown:
        names = ", ".join(str(name)[:40] for name in twice or unknown)
        raise MalformedMessage(f"{'arguments given twice' if twice else 'unknown arguments'}: {names}")
    given.update(kwargs)
    for name, check in (("payment_link_id", validate_payment_link_id), ("request_id", validate_request_id)):
        if name not in given:
            raise MalformedMessage(f"{name}: missing")
        try:
            check(given[name])
        except ValueError:
            # Not echoed: a value in the wrong field may be anything, personal data included.
            kind = type(given[name]).__name__
            raise MalformedMessage(f"{name}: must be a string of 1-50 allowed characters (got a {kind})") from None
    return given["payment_link_id"], given["request_id"]


def refuse(rt: Runtime, args: tuple, kwargs: dict, problem: MalformedMessage) -> str:
    """A message that cannot run never vanishes: a ``failed`` / ``rejected`` record under its
    Request-ID when it has a usable one that is not taken, else a count (``malformed``)."""
    given = {**dict(zip(ARGUMENTS, args)), **kwargs}
    request_id, link_id = given.get("request_id"), given.get("payment_link_id")
    request_id = request_id if _valid(validate_request_id, request_id) else None
    link_id = link_id if _valid(validate_payment_link_id, link_id) else None
    error = {"http_status": None, "code": "MALFORMED_MESSAGE", "message": str(problem)}
    if request_id and rt.ledger.reject(request_id, link_id, error):
        log.error("cancel message refused: %s", problem, extra={"request_id": request_id, "payment_link_id": link_id,
                                                                 "state": "failed", "outcome": "rejected"})
        report_failed(request_id, link_id or "", "rejected", 0, error, None)
        return "rejected"
    malformed.count(rt.redis, rt.keys, malformed.BAD_ARGUMENTS)
    log.error("cancel message dropped: %s (no usable request_id that is not already taken; counted as "
              "malformed)", problem)
    return "malformed"


def _valid(check, value) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


@app.task(name=CANCEL_TASK, bind=True, typing=False)
def cancel_payment_link(self, *args, **kwargs) -> str:
    """Cancel one Plural payment link: ``payment_link_id``, and ``request_id``, the idempotency
    key of this cancel (by keyword, or in that order).

    Sent by name (``send_task("tasks.cancel_payment_link", kwargs=...)``) from any
    service; creates the status record when the sender did not. Celery's own argument
    check is off (``typing=False``) so that a malformed message reaches :func:`refuse`
    instead of failing in Celery and vanishing.
    """
    try:
        payment_link_id, request_id = parse_arguments(args, kwargs)
    except MalformedMessage as problem:
        return refuse(self.app.runtime, args, kwargs, problem)
    try:
        return execute(self.app.runtime, payment_link_id, request_id)
    except REDIS_AWAY as exc:
        # Redis went away mid-delivery (a restart, a failover): not this cancel's failure, and
        # nothing is lost, since the ledger's due index sends it again once Redis is back. One
        # line per delivery instead of a traceback and a Sentry event each (every cancel in
        # flight hits it at once); Ignore is control flow, which Sentry's Celery integration
        # never reports.
        log.warning("cancel interrupted: Redis unreachable (%s); the ledger sends it again", type(exc).__name__,
                    extra={"request_id": request_id, "payment_link_id": payment_link_id})
        raise Ignore() from None
    except redis.ResponseError as exc:
        if not write_refused(exc):
            raise
        # Redis refuses writes for a while (no replica for min-replicas-to-write, maxmemory,
        # a failing disk): as for Redis away, above, the ledger sends the cancel again.
        log.warning("cancel interrupted: Redis refuses writes (%s); the ledger sends it again", refusal_code(exc),
                    extra={"request_id": request_id, "payment_link_id": payment_link_id})
        raise Ignore() from None
