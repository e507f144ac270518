"""The Redis work around one attempt at Plural, in two round trips: admit, then settle.

This is the one writer of an attempt's result: every path of the cancel task goes
through it, and nothing else writes a cancel's state from a worker.

- ``admit``, before the call: may this delivery take the cancel (the ledger's claim),
  is its retry budget left (if not, the cancel ends ``gave_up`` right here), may
  anyone call Plural now (the breaker), and which rate-limit slot is ours (the limiter).
  The budget starts when the first call is let through.
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

from dataclasses import dataclass
from typing import Any

from plural_cancel.worker.breaker import ALLOW_FN, NO_NEWS, RECORD_FN, Gate, RedisCircuitBreaker, parse_gate
from plural_cancel.worker.ledger import STALE, Claim, Ledger, parse_claim
from plural_cancel.worker.ledger_lua import CLAIM_FN, DEFER_FN, FINISH_FN
from plural_cancel.worker.ratelimit import OBSERVE_FN, RESERVE_FN, RedisRateLimiter, Reservation, parse_reservation

_SLICE = """
local function slice(t, i, j)
  local out = {}
  for n = i, j do out[#out + 1] = t[n] end
  return out
end
"""

# KEYS: [1-8] the claim's  [9-18] the finish's (for gave_up)  [19-20] the breaker's
#       [21-22] the limiter's
# ARGV: [1-9] the claim's  [10-16] the finish's  [17-19] allow's  [20-22] reserve's (rate,
#       burst, max_wait)  [23] max_wait for the breaker's probe
# Returns {claim} when the claim is refused; {{'gave_up', attempts, last_error, link_status}}
# when the budget is spent (the record is then ended); {claim, gate} when the breaker
# says wait; else {claim, gate, reservation}.
ADMIT = CLAIM_FN + FINISH_FN + ALLOW_FN + RESERVE_FN + _SLICE + """
local c = claim(slice(KEYS, 1, 8), slice(ARGV, 1, 9))
if c[1] ~= 'claimed' then return {c} end
if tonumber(c[3]) <= 0 then
  local r = redis.call('HMGET', KEYS[1], 'last_error', 'link_status')
  local attempts = finish(slice(KEYS, 9, 18), slice(ARGV, 10, 16))
  return {{'gave_up', attempts, r[1] or '', r[2] or ''}}
end
local g = allow(slice(KEYS, 19, 20), slice(ARGV, 17, 19))
if g[1] ~= 'closed' and g[1] ~= 'probe' then return {c, g} end
local a = slice(ARGV, 20, 22)
-- The probe must go through (nobody else calls Plural meanwhile), so it may wait longer.
if g[1] == 'probe' then a[3] = ARGV[23] end
local slot = reserve(slice(KEYS, 21, 22), a)
-- A call goes: the retry budget starts now if this is the cancel's first attempt.
if slot[1] == 1 and not redis.call('HGET', KEYS[1], 'deadline') then
  redis.call('HSET', KEYS[1], 'deadline', fmt(redis_now() + tonumber(ARGV[9])))
end
return {c, g, slot}
"""

# KEYS: the ledger's finish or defer keys (ARGV[2] of them), then the breaker's 4 when
#       ARGV[4] is '1', then the limiter's pace key when ARGV[5] is '1'
# ARGV: [1] 'finish' or 'defer'  [2] number of ledger keys  [3] number of ledger args
#       [4] tell the breaker (0/1)  [5] tell the pace (0/1: Plural answered a call)
#       [6] number of breaker args  [7] number of limiter args, then the ledger's args, the
#       breaker's args, the limiter's args
# Returns {attempts, opened}: attempts made (-1: stale, nothing written), opened 1 when
# this failure opened the breaker.
SETTLE = FINISH_FN + DEFER_FN + RECORD_FN + OBSERVE_FN + _SLICE + """
local nkeys, nargs, nbreaker, nlimiter = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6]), tonumber(ARGV[7])
local write = finish
if ARGV[1] == 'defer' then write = defer end
local attempts = write(slice(KEYS, 1, nkeys), slice(ARGV, 8, 7 + nargs))
if attempts == -1 then return {-1, 0} end
local opened = 0
local first = nkeys + 1
if ARGV[4] == '1' then
  opened = record(slice(KEYS, first, first + 3), slice(ARGV, 8 + nargs, 7 + nargs + nbreaker))
  first = first + 4
end
if ARGV[5] == '1' then
  observe({KEYS[first]}, slice(ARGV, 8 + nargs + nbreaker, 7 + nargs + nbreaker + nlimiter))
end
return {attempts, opened}
"""


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


class Attempts:
    """The ledger, breaker and limiter of one process, asked together around each call."""

    def __init__(self, ledger: Ledger, breaker: RedisCircuitBreaker, limiter: RedisRateLimiter):
        self.ledger = ledger
        self.breaker = breaker
        self.limiter = limiter
        self._admit = ledger.redis.register_script(ADMIT)
        self._settle = ledger.redis.register_script(SETTLE)

    def admit(self, request_id: str, payment_link_id: str, owner: str, lease: float, *,
              max_wait: float, probe_max_wait: float) -> Admission:
        """Claim the cancel for ``lease`` seconds (ending it ``gave_up`` when its budget is
        spent), then ask the breaker, then reserve a slot at most ``max_wait`` seconds away
        (``probe_max_wait`` for the breaker's probe)."""
        claim_keys, claim_args = self.ledger.claim_call(request_id, payment_link_id, owner, lease)
        gave_up_keys, gave_up_args = self.ledger.finish_call(request_id, payment_link_id, owner, state="failed",
                                                             outcome="gave_up", attempted=False)
        allow_keys, allow_args = self.breaker.allow_call(owner)
        reserve_keys, reserve_args = self.limiter.reserve_call(max_wait)
        reply = self._admit(keys=[*claim_keys, *gave_up_keys, *allow_keys, *reserve_keys],
                            args=[*claim_args, *gave_up_args, *allow_args, *reserve_args,
                                  repr(max(0.0, probe_max_wait))])
        claim = parse_claim(reply[0])
        gate = parse_gate(reply[1]) if len(reply) > 1 else None
        slot = parse_reservation(reply[2]) if len(reply) > 2 else None
        return Admission(claim, gate, slot)

    def finish(self, request_id: str, payment_link_id: str, owner: str, *, health: Health = NOTHING,
               **fields: Any) -> Settled:
        """End the cancel (``fields`` as :meth:`Ledger.finish_call` takes them) and tell the
        breaker and limiter what ``health`` says, in one round trip, if ``owner`` still holds it."""
        keys, args = self.ledger.finish_call(request_id, payment_link_id, owner, **fields)
        return self._settle_call("finish", keys, args, health, payment_link_id, owner)

    def defer(self, request_id: str, payment_link_id: str, owner: str, *, health: Health = NOTHING,
              **fields: Any) -> Settled:
        """Defer the cancel (``fields`` as :meth:`Ledger.defer_call` takes them: ``delay`` in
        seconds) and tell the breaker and limiter, as :meth:`finish`."""
        keys, args = self.ledger.defer_call(request_id, owner, **fields)
        return self._settle_call("defer", keys, args, health, payment_link_id, owner)

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
        attempts, opened = self._settle(
            keys=[*keys, *breaker_keys, *limiter_keys],
            args=[write, len(keys), len(args), int(tell_breaker), int(health.called), len(breaker_args),
                  len(limiter_args), *args, *breaker_args, *limiter_args])
        attempts = int(attempts)
        if attempts == STALE:
            return Settled(0, stale=True)
        return Settled(attempts, opened=bool(int(opened)))

