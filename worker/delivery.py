"""One delivery of one cancel, from the claim to what is written: the cancel task's body.

The path: ``worker.attempts`` admits the delivery (the claim, the breaker's gate, a
rate-limit slot: one round trip); ``worker.decide`` calls Plural and says what the attempt
came to; ``worker.policy`` makes that an ending or a retry with its delay;
``worker.attempts`` writes it, with what the attempt showed of Plural's health (the
second round trip). This module only carries those decisions out; it makes none.
"""

from __future__ import annotations

import logging
import time
import uuid

from plural_cancel.config.accounts import RELOAD_INTERVAL
from plural_cancel.config.celery import lease_seconds
from plural_cancel.errors import MalformedMessage, PluralConnectionError, PluralRateLimited, PluralTimeout, SlotMissed
from plural_cancel.worker import breaker, malformed, metrics, reporting
from plural_cancel.worker.attempts import Health, Settled
from plural_cancel.worker.breaker import NO_NEWS
from plural_cancel.worker.decide import Decision, attempt, error_summary, retry_reason
from plural_cancel.worker.keys import DEFAULT_ACCOUNT
from plural_cancel.worker.links import format_timestamp
from plural_cancel.worker.policy import unsettled
from plural_cancel.worker.runtime import PACING, Lane, Runtime

# Every line of a cancel's path under its task's name, so that log filters need one name.
log = logging.getLogger("plural_cancel.tasks.cancel")

PROBE_MAX_WAIT = 10.0
"""Seconds the breaker's probe may wait for a rate-limit slot."""

SLOT_LATENESS = 1 / PACING - 1 - 0.006
"""Seconds after its rate-limit slot that a cancel's PUT may still leave (its
``Request-Timestamp``); one that would leave later gives the slot up. The limiter grants
``PACING`` of the limit, so slots are ``1 / (PACING * limit)`` apart, and a 1-s window of
Request-Timestamps holds the slots of ``1 + SLOT_LATENESS + 0.001`` s (the stamp is cut to
the millisecond): under ``1 / PACING`` s, so never more than the limit. The 6 ms spare
cover that millisecond and the slew between the clock that sleeps and the one that stamps."""


def deliver(rt: Runtime, args: tuple, kwargs: dict) -> str:
    """One message of the cancel task: its arguments read (``worker.malformed``), then the
    cancel run (:func:`execute`), or the message refused; returns what became of it."""
    try:
        payment_link_id, request_id, account = malformed.parse_arguments(args, kwargs)
    except MalformedMessage as problem:
        refused = malformed.refuse(rt, args, kwargs, problem)
        if refused is None:
            return "malformed"
        # Its record is written ended (``REJECT``): created and ended in the same instant.
        known = (refused.account or DEFAULT_ACCOUNT) in rt.local_accounts()
        report_failed(refused.request_id, refused.payment_link_id or "", "rejected", 0, refused.error, None,
                      account=refused.account, age=0.0, label=None if known else UNKNOWN_ACCOUNT)
        return "rejected"
    lane = rt.lane(account)
    if lane is None:
        return refuse_account(rt, payment_link_id, request_id, account)
    return execute(rt, payment_link_id, request_id, lane)


UNKNOWN_ACCOUNT = "unknown"
"""The metrics' ``account`` label of a cancel whose account no worker knows: a name anyone can
send by name must not add a series per name (Sentry and the record still name it)."""


def refuse_account(rt: Runtime, payment_link_id: str, request_id: str, account: str) -> str:
    """A cancel of an account this worker does not know, even after reading the accounts file
    again. Another worker has published it: this host's file is behind that one's (a file
    being rolled out), so the cancel is put off until this worker's next look at its file.
    No worker has (never in a file, or removed from it): it ends ``failed`` / ``rejected``,
    with a ``last_error`` naming the account, as a malformed message does."""
    owner, lease = uuid.uuid4().hex, lease_seconds(rt.settings)
    ids = {"request_id": request_id, "payment_link_id": payment_link_id, "account": account}
    if rt.redis.hexists(rt.keys.accounts, account):
        claim = rt.attempts.wait_for_account(request_id, payment_link_id, owner, lease, account=account,
                                             delay=RELOAD_INTERVAL)
        if claim.verdict == "claimed":
            log.warning("cancel put off: account %r is published by another worker, not yet in this one's "
                        "accounts file", account, extra={**ids, "state": "queued", "reason": "account"})
            return "waiting"
    else:
        error = {"http_status": None, "code": "UNKNOWN_ACCOUNT",
                 "message": f"account {account!r} is not in the workers' accounts (PLURAL_ACCOUNTS_FILE)"}
        claim = rt.attempts.refuse(request_id, payment_link_id, owner, lease, account=account, error=error)
        if claim.verdict == "claimed":
            rt.ledger.forget_idle_account(account)
            log.error("cancel refused: account %r is not in the workers' accounts", account,
                      extra={**ids, "state": "failed", "outcome": "rejected"})
            report_failed(request_id, payment_link_id, "rejected", claim.attempts, error, None, account=account,
                          age=claim.age, label=UNKNOWN_ACCOUNT)
            return "rejected"
    if claim.verdict == "mismatch":
        return _conflict(rt, claim, ids)
    return claim.verdict  # a copy of a cancel already ended, or held by another delivery


def _conflict(rt: Runtime, claim, ids: dict) -> str:
    """A message whose Request-ID names the cancel of another link or account: this message's
    link is not cancelled under it. Not a copy of anything the ledger carries, so it is
    counted and reported, with both links, for someone to send it under a Request-ID of its own."""
    log.error("cancel message refused: request_id %s names the cancel of another link (%s); this link is not "
              "cancelled (counted as malformed: request_id_conflict)", ids["request_id"], claim.link,
              extra={**ids, "sentry": reporting.REPORTED})
    malformed.count(rt.redis, rt.keys, malformed.REQUEST_ID_CONFLICT)
    reporting.report_request_id_conflict(request_id=ids["request_id"], payment_link_id=ids["payment_link_id"],
                                         taken_by=claim.link, account=ids["account"])
    return "conflict"


def execute(rt: Runtime, payment_link_id: str, request_id: str, lane: Lane | None = None) -> str:
    """Run one delivery of one cancel of ``lane``'s account (the default one unless given);
    returns what became of it (for logs and tests).

    Every write goes through the lane's ``attempts``: one round trip when this copy has
    nothing to do (or the budget is spent), two otherwise (``worker.attempts``).
    """
    settings, policy = rt.settings, rt.policy
    lane = lane or rt.lane(DEFAULT_ACCOUNT)
    attempts, account = lane.attempts, lane.account.name
    owner = uuid.uuid4().hex
    began = time.monotonic()
    probe_max_wait = min(PROBE_MAX_WAIT, settings.attempt_timeout - settings.connect_timeout - settings.read_timeout)
    admitted = attempts.admit(request_id, payment_link_id, owner, lease_seconds(settings), budget=policy.budget,
                              max_wait=settings.limiter_max_wait, probe_max_wait=probe_max_wait)
    answered = time.monotonic()
    claim = admitted.claim
    ids = {"request_id": request_id, "payment_link_id": payment_link_id, "account": account,
           "attempts": claim.attempts}
    if claim.verdict == "gave_up":
        error = claim.last_error
        log.warning("cancel failed: gave_up (retry budget spent)",
                    extra={**ids, "state": "failed", "outcome": "gave_up", "error": error})
        report_failed(request_id, payment_link_id, "gave_up", claim.attempts, error, claim.link_status,
                      account=account, age=claim.age)
        return "gave_up"
    if claim.verdict == "mismatch":
        return _conflict(rt, claim, ids)
    if claim.verdict != "claimed":
        # A copy with nothing to do (ended, following, held by another delivery, early):
        # the due index carries the cancel, so this message is simply dropped.
        return claim.verdict
    log.debug("cancel running", extra={**ids, "state": "running"})
    waiting = "retrying" if claim.attempts else "queued"  # the state a hold before any call leaves

    gate = admitted.gate
    if not gate.allowed:
        # Plural is down: wait for the reopening time without spending an attempt.
        if not _accepted(rt, attempts.defer(request_id, payment_link_id, owner,
                                            delay=policy.breaker_hold(gate.retry_in), attempted=False), ids):
            return "stale"
        log.info("cancel held: the circuit breaker is open", extra={**ids, "state": waiting, "reason": "breaker"})
        metrics.DEFERRALS.labels("breaker", account).inc()
        return "held"
    max_wait = probe_max_wait if gate.probe else settings.limiter_max_wait
    slot = admitted.slot
    if not slot.granted:
        # A probe that got no slot learnt nothing: its settle frees the probe slot.
        if not _accepted(rt, attempts.defer(request_id, payment_link_id, owner, attempted=False,
                                            delay=policy.slot_hold(slot.wait, max_wait),
                                            health=Health(NO_NEWS, gate.probe)), ids):
            return "stale"
        log.info("cancel held: rate limit", extra={**ids, "state": waiting, "reason": "rate_limit"})
        metrics.DEFERRALS.labels("rate_limit", account).inc()
        return "throttled"
    # Redis's clock put the slot ``wait`` after it ran the script, which was somewhere between
    # the asking and the answer: sleep from the answer (never early), send by SLOT_LATENESS
    # after the asking (never late, however long the answer took to reach this thread).
    if (sleep := answered + slot.wait - time.monotonic()) > 0:
        time.sleep(sleep)  # the slot is ours from then on
    metrics.LIMITER_WAIT.observe(slot.wait)

    # The attempt's calls share what is left of its bound, so it ends inside its lease.
    try:
        with lane.plural.within(settings.attempt_timeout - (time.monotonic() - began),
                                send_by=began + slot.wait + SLOT_LATENESS):
            decision = attempt(lane.plural, payment_link_id, request_id)
    except SlotMissed:
        # The PUT would have left too late (the process stalled: CPU starvation, a GC pause,
        # a queue for the GIL, a token being fetched), together with those of the slots after
        # it, and crowded Plural's second past the limit. The slot is given up, nothing was
        # sent, and the cancel takes a new one.
        if not _accepted(rt, attempts.defer(request_id, payment_link_id, owner, attempted=False,
                                            delay=policy.slot_hold(0.0, max_wait),
                                            health=Health(NO_NEWS, gate.probe)), ids):
            return "stale"
        log.info("cancel held: late for its rate-limit slot", extra={**ids, "state": waiting, "reason": "rate_limit"})
        metrics.DEFERRALS.labels("rate_limit", account).inc()
        return "late"
    return record(rt, decision, payment_link_id, request_id, owner, lane=lane,
                  attempts=claim.attempts + int(decision.attempted), throttles=claim.throttles,
                  budget_left=claim.budget_left - (time.monotonic() - began), probe=gate.probe, sent_at=slot.at)


def health(decision: Decision, probe: bool, sent_at: float = 0.0) -> Health:
    """What this attempt showed of Plural's health, for the breaker (``breaker.news``) and the
    pace (the calls Plural answered, and which it throttled); ``sent_at``: when the call's
    slot was granted."""
    error = decision.error
    called = decision.attempted and not isinstance(error, (PluralTimeout, PluralConnectionError))
    return Health(breaker.news(error, unsettled=unsettled(decision.state, error)), probe, called=called,
                  throttled=isinstance(error, PluralRateLimited), sent_at=sent_at)


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
        account = ids.get("account", DEFAULT_ACCOUNT)
        log.error("circuit breaker opened for account %s: Plural is failing (%s); its cancels are held until it "
                  "reopens", account, code or type(error).__name__, extra={"sentry": reporting.REPORTED,
                                                                           "account": account})
        metrics.BREAKER_OPENINGS.labels(account).inc()
        reporting.report_breaker_opened(code=code, http_status=getattr(error, "http_status", None),
                                        cooldown=rt.settings.breaker_cooldown, account=account)
    return True


def record(rt: Runtime, decision: Decision, payment_link_id: str, request_id: str, owner: str, *,
           attempts: int, budget_left: float, throttles: int = 0, probe: bool = False, sent_at: float = 0.0,
           lane: Lane | None = None) -> str:
    """Write what the policy makes of ``decision``: an ending, or a retry inside the budget left
    (seconds), with what the attempt showed of Plural's health, in one round trip.
    ``attempts``: made so far, this one included; ``throttles``: of those before it, the ones
    Plural throttled. ``lane``: the cancel's account's (the default one's unless given)."""
    lane = lane or rt.lane(DEFAULT_ACCOUNT)
    account = lane.account.name
    error = error_summary(decision.error)
    seen = health(decision, probe, sent_at)
    fields = {"request_id": request_id, "payment_link_id": payment_link_id, "account": account, "attempts": attempts}
    step = rt.policy.settle(decision.state, decision.outcome, decision.error, attempts=attempts,
                            throttles=throttles, budget_left=budget_left)
    if step.state == "retry":
        settled = lane.attempts.defer(request_id, payment_link_id, owner, health=seen, delay=step.delay,
                                      attempted=decision.attempted, last_error=error,
                                      throttled=step.throttled and decision.attempted)
        if not _accepted(rt, settled, fields, decision.error):
            return "stale"
        log.info("cancel retrying in %.1fs", step.delay, extra={**fields, "state": "retrying", "error": error})
        metrics.RETRIES.labels(retry_reason(decision), account).inc()
        return "retrying"
    link = decision.link
    settled = lane.attempts.finish(
        request_id, payment_link_id, owner, health=seen, state=step.state,
        outcome=step.outcome, attempted=decision.attempted,
        link_status=link.status if link else None,
        cancelled_at=format_timestamp(link.cancelled_at) if link and link.cancelled_at else None,
        amount={"value": link.amount.value, "currency": link.amount.currency} if link and link.amount else None,
        last_error=error,
    )
    if not _accepted(rt, settled, fields, decision.error):
        return "stale"
    level = logging.INFO if step.state == "succeeded" else logging.WARNING
    log.log(level, "cancel %s: %s", step.state, step.outcome,
            extra={**fields, "state": step.state, "outcome": step.outcome, "error": error})
    if step.state == "failed":
        report_failed(request_id, payment_link_id, step.outcome, attempts, error, link.status if link else None,
                      account=account, age=settled.age)
    else:
        metrics.ended(step.outcome, account, settled.age)
    return step.outcome


def report_failed(request_id: str, payment_link_id: str, outcome: str, attempts: int, error: dict | None,
                  link_status: str | None, *, account: str | None = None, age: float | None = None,
                  label: str | None = None) -> None:
    """A cancel has just been recorded ``failed``: count it and report it, once. ``age``:
    seconds from its record's ``created_at`` to its end; ``label``: the metrics' account
    label, when not ``account`` (:data:`UNKNOWN_ACCOUNT`).

    Once, because only the delivery holding the claim finishes a record, and a
    finished record is never claimed again.
    """
    account = account or DEFAULT_ACCOUNT
    metrics.ended(outcome, label or account, age)
    reporting.report_failure(request_id=request_id, payment_link_id=payment_link_id, outcome=outcome,
                             attempts=attempts, error=error, link_status=link_status, account=account)
