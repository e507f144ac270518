"""The Redis work around one attempt at Plural, in two round trips: admit, then settle.

This is the one writer of an attempt's result: every path of the cancel task goes
through it (a malformed message's refusal too, :meth:`Attempts.reject`), and nothing else
writes a cancel's state from a worker.

- ``admit``, before the call: may this delivery take the cancel (the ledger's claim),
  is its retry budget left (if not, the cancel ends ``gave_up`` right here: the budget is
  the retry policy's, ``worker.policy``, handed in), may anyone call Plural now (the
  breaker), and which rate-limit slot is ours (the limiter). The budget starts when the
  first call is let through (the ledger's ``start_budget``).
- ``settle``, after it (or after a hold): the ledger's finish or defer, fenced on the
  owner token of the claim, and what the call showed of Plural's health (the breaker's
  success or failure, the pace's count of answered and throttled calls), written only
  when the fence holds.

Round trips per delivery: one when the claim is refused (a duplicate, an early or
stale copy) or the budget is spent; two on every other path (held by the breaker,
throttled by the limiter, or Plural called).

The rules stay in their modules: each script is the ledger's, the breaker's and the
limiter's own Lua functions called in order, each asked only when the one before said
yes. A pipeline would not do: redis-py sends ``SCRIPT EXISTS`` ahead of every pipeline
that holds a script, and the admission's questions depend on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from plural_cancel.worker.breaker import ALLOW_FN, NO_NEWS, RECORD_FN, Gate, RedisCircuitBreaker, parse_gate
from plural_cancel.worker.keys import DEFAULT_ACCOUNT
from plural_cancel.worker.ledger import STALE, Claim, Ledger, parse_claim
from plural_cancel.worker.ledger_lua import CLAIM_FN, DEFER_FN, FINISH_FN, GIVE_UP_FN
from plural_cancel.worker.lua import SECTIONS, script
from plural_cancel.worker.ratelimit import OBSERVE_FN, RESERVE_FN, RedisRateLimiter, Reservation, parse_reservation

# KEYS: the claim's, the finish's (for gave_up), the breaker's gate's and the limiter's
#       reservation's, in that order, as many of each as ARGV[1-4] say
# ARGV: [1-4] how many KEYS each section holds  [5-8] how many ARGV each takes
#       [9] max_wait for the breaker's probe, then the sections' ARGV in the same order
# Returns {claim} when the claim is refused; {{'gave_up', attempts, last_error, link_status}}
# when the budget (the policy's, in the claim's ARGV) is spent and the record is ended;
# {claim, gate} when the breaker says wait; else {claim, gate, reservation}.
ADMIT = script(CLAIM_FN, GIVE_UP_FN, ALLOW_FN, RESERVE_FN, SECTIONS, """
local claim_keys, finish_keys, allow_keys, reserve_keys = sections(KEYS, 1, ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local claim_args, finish_args, allow_args, reserve_args = sections(ARGV, 10, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
local probe_max_wait = ARGV[9]
local c = claim(claim_keys, claim_args)
if c[1] ~= 'claimed' then return {c} end
if tonumber(c[3]) <= 0 then return {give_up(finish_keys, finish_args)} end
local g = allow(allow_keys, allow_args)
if g[1] ~= 'closed' and g[1] ~= 'probe' then return {c, g} end
-- The probe must go through (nobody else calls Plural meanwhile), so it may wait longer
-- for its slot (the reservation's third argument, max_wait).
if g[1] == 'probe' then reserve_args[3] = probe_max_wait end
local slot = reserve(reserve_keys, reserve_args)
if slot[1] == 1 then start_budget(claim_keys, claim_args) end
return {c, g, slot}
""")

# KEYS: the ledger's finish or defer keys, the breaker's (none: nothing to tell it) and
#       the pace's (none: Plural answered no call), as many of each as ARGV[2-4] say
# ARGV: [1] 'finish' or 'defer'  [2-4] how many KEYS each section holds  [5-7] how many
#       ARGV each takes, then the sections' ARGV in the same order
# Returns {attempts, opened, age}: attempts made (-1: stale, nothing written), opened 1 when
# this failure opened the breaker, age the seconds from the record's created_at to its end
# ('' for a defer).
SETTLE = script(FINISH_FN, DEFER_FN, RECORD_FN, OBSERVE_FN, SECTIONS, """
local kind = ARGV[1]
local write_keys, breaker_keys, pace_keys = sections(KEYS, 1, ARGV[2], ARGV[3], ARGV[4])
local write_args, breaker_args, pace_args = sections(ARGV, 8, ARGV[5], ARGV[6], ARGV[7])
local write = finish
if kind == 'defer' then write = defer end
local attempts, age = write(write_keys, write_args)
if attempts == -1 then return {-1, 0, ''} end
local opened = 0
if #breaker_keys > 0 then opened = record(breaker_keys, breaker_args) end
if #pace_keys > 0 then observe(pace_keys, pace_args) end
return {attempts, opened, age or ''}
""")


# KEYS: the claim's, then the finish's or the defer's, as many of each as ARGV[2-3] say
# ARGV: [1] 'finish' or 'defer'  [2-3] how many KEYS each section holds  [4-5] how many ARGV
#       each takes, then the sections' ARGV in the same order
# Returns {claim} when the claim is refused, else {claim, attempts, age}: ended (age: seconds
# from its record's created_at) or deferred (no age), without an attempt.
SET_ASIDE = script(CLAIM_FN, FINISH_FN, DEFER_FN, SECTIONS, """
local claim_keys, write_keys = sections(KEYS, 1, ARGV[2], ARGV[3])
local claim_args, write_args = sections(ARGV, 6, ARGV[4], ARGV[5])
local c = claim(claim_keys, claim_args)
if c[1] ~= 'claimed' then return {c} end
if ARGV[1] == 'defer' then return {c, defer(write_keys, write_args)} end
return {c, finish(write_keys, write_args)}
""")


@dataclass(frozen=True)
class Admission:
    """What :meth:`Attempts.admit` decided for one delivery."""

    claim: Claim
    gate: Gate | None = None
    """None when not asked: the claim was refused, or the retry budget is spent."""
    slot: Reservation | None = None
    """None when not asked: no gate, or the gate said wait."""


@dataclass(frozen=True)
class Health:
    """What one attempt showed of Plural, for the breaker and the limiter."""

    breaker: str = NO_NEWS
    """``success`` (Plural answered), ``failure`` (an outage-like failure) or '' (no news):
    ``worker.breaker``'s SUCCESS, FAILURE, NO_NEWS."""
    probe: bool = False
    """The call was (or would have been) the breaker's probe: its result, news or none,
    frees the probe slot."""
    called: bool = False
    """Plural answered the call (the pace counts it): not when nothing was sent or nothing came back."""
    throttled: bool = False
    """Plural answered "slower" (a 429, or a 4xx in its words for a rate limit)."""
    sent_at: float = 0.0
    """When the call's slot was granted (``Reservation.at``): an answer to a call granted
    before the pace's last cut says nothing of the pace since."""


NOTHING = Health()


@dataclass(frozen=True)
class Settled:
    """What :meth:`Attempts.settle` wrote."""

    attempts: int
    """Attempts made, this one included."""
    stale: bool = False
    """The delivery no longer held the cancel (its lease ran out and it was taken over): nothing was written."""
    opened: bool = False
    """This attempt's failure opened the breaker (report it, once)."""
    age: float | None = None
    """For an ending: seconds from the record's ``created_at`` to its end, by Redis's clock."""


class Attempts:
    """The ledger and one account's breaker and limiter, asked together around each call of
    that account's cancels."""

    def __init__(self, ledger: Ledger, breaker: RedisCircuitBreaker, limiter: RedisRateLimiter, *,
                 account: str = DEFAULT_ACCOUNT):
        self.ledger = ledger
        self.breaker = breaker
        self.limiter = limiter
        self.account = account
        self._admit = ledger.redis.register_script(ADMIT)
        self._settle = ledger.redis.register_script(SETTLE)
        self._set_aside = ledger.redis.register_script(SET_ASIDE)

    def admit(self, request_id: str, payment_link_id: str, owner: str, lease: float, *, budget: float,
              max_wait: float, probe_max_wait: float) -> Admission:
        """Claim the cancel for ``lease`` seconds (ending it ``gave_up`` when its ``budget``,
        seconds from its first attempt, is spent), then ask the breaker, then reserve a slot
        at most ``max_wait`` seconds away (``probe_max_wait`` for the breaker's probe)."""
        claim_keys, claim_args = self.ledger.claim_call(request_id, payment_link_id, owner, lease, budget,
                                                        self.account)
        gave_up_keys, gave_up_args = self.ledger.finish_call(request_id, payment_link_id, owner, state="failed",
                                                             outcome="gave_up", attempted=False, account=self.account)
        allow_keys, allow_args = self.breaker.allow_call(owner)
        reserve_keys, reserve_args = self.limiter.reserve_call(max_wait)
        sections = (claim_keys, gave_up_keys, allow_keys, reserve_keys)
        arguments = (claim_args, gave_up_args, allow_args, reserve_args)
        reply = self._admit(keys=[key for section in sections for key in section],
                            args=[*map(len, sections), *map(len, arguments), repr(max(0.0, probe_max_wait)),
                                  *(arg for section in arguments for arg in section)])
        claim = parse_claim(reply[0])
        gate = parse_gate(reply[1]) if len(reply) > 1 else None
        slot = parse_reservation(reply[2]) if len(reply) > 2 else None
        return Admission(claim, gate, slot)

    def finish(self, request_id: str, payment_link_id: str, owner: str, *, health: Health = NOTHING,
               **fields: Any) -> Settled:
        """End the cancel (``fields`` as :meth:`Ledger.finish_call` takes them) and tell the
        breaker and limiter what ``health`` says, in one round trip, if ``owner`` still holds it."""
        keys, args = self.ledger.finish_call(request_id, payment_link_id, owner, account=self.account, **fields)
        return self._settle_call("finish", keys, args, health, payment_link_id, owner)

    def defer(self, request_id: str, payment_link_id: str, owner: str, *, health: Health = NOTHING,
              **fields: Any) -> Settled:
        """Defer the cancel (``fields`` as :meth:`Ledger.defer_call` takes them: ``delay`` in
        seconds) and tell the breaker and limiter, as :meth:`finish`."""
        keys, args = self.ledger.defer_call(request_id, owner, **fields)
        return self._settle_call("defer", keys, args, health, payment_link_id, owner)

    def reject(self, request_id: str, payment_link_id: str | None, error: dict, account: str | None = None) -> bool:
        """End a malformed message's cancel ``failed`` / ``rejected`` (``Ledger.reject``); False
        when its Request-ID is taken and nothing was written."""
        return self.ledger.reject(request_id, payment_link_id, error, account)

    def refuse(self, request_id: str, payment_link_id: str, owner: str, lease: float, *, account: str,
               error: dict) -> Claim:
        """End a well-formed cancel of an account no worker knows ``failed`` / ``rejected``, with
        ``error`` as its last error: claimed (its record created if the message was sent by
        name), then finished, in one round trip. The claim as it was: anything but
        ``claimed`` means this copy had nothing to end (``Attempts.admit``'s verdicts)."""
        write = self.ledger.finish_call(request_id, payment_link_id, owner, state="failed", outcome="rejected",
                                        attempted=False, last_error=error, account=account)
        return self._aside("finish", request_id, payment_link_id, owner, lease, account, write)

    def wait_for_account(self, request_id: str, payment_link_id: str, owner: str, lease: float, *, account: str,
                         delay: float) -> Claim:
        """Put off, ``delay`` seconds and without an attempt, a cancel of an account this worker
        does not know yet but another worker has published (its accounts file reached that
        host first): claimed, then deferred, in one round trip."""
        write = self.ledger.defer_call(request_id, owner, delay=delay, attempted=False)
        return self._aside("defer", request_id, payment_link_id, owner, lease, account, write)

    def _aside(self, kind: str, request_id: str, payment_link_id: str, owner: str, lease: float, account: str,
               write: tuple[list[str], list[Any]]) -> Claim:
        claim_keys, claim_args = self.ledger.claim_call(request_id, payment_link_id, owner, lease, 0.0, account)
        write_keys, write_args = write
        reply = self._set_aside(keys=[*claim_keys, *write_keys],
                                args=[kind, len(claim_keys), len(write_keys), len(claim_args), len(write_args),
                                      *claim_args, *write_args])
        claim = parse_claim(reply[0])
        # Ended here: the claim carries the ending's age, as a gave_up one does.
        return replace(claim, age=float(reply[2])) if len(reply) > 2 else claim

    def _settle_call(self, write: str, keys: list[str], args: list[Any], health: Health,
                     payment_link_id: str, owner: str) -> Settled:
        breaker_keys: list[str] = []
        breaker_args: list[Any] = []
        tell_breaker = health.breaker != NO_NEWS or health.probe
        if tell_breaker:
            breaker_keys, breaker_args = self.breaker.record_call(health.breaker, payment_link_id,
                                                                  probe=health.probe, owner=owner)
        limiter_keys: list[str] = []
        limiter_args: list[Any] = []
        if health.called:
            limiter_keys, limiter_args = self.limiter.observe_call(health.throttled, health.sent_at)
        attempts, opened, age = self._settle(
            keys=[*keys, *breaker_keys, *limiter_keys],
            args=[write, len(keys), len(breaker_keys), len(limiter_keys), len(args), len(breaker_args),
                  len(limiter_args), *args, *breaker_args, *limiter_args])
        attempts = int(attempts)
        if attempts == STALE:
            return Settled(0, stale=True)
        return Settled(attempts, opened=bool(int(opened)), age=float(age) if age else None)

