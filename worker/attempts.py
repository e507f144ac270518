"""The Redis work around one attempt at Plural, in two round trips: admit, then settle.

Before each call the task asks three things in order: may this delivery take the
cancel (the ledger's claim), may anyone call Plural now (the breaker), and which
rate-limit slot is ours (the limiter). After it, it writes the outcome (the ledger's
finish or defer) and, when Plural answered, tells the breaker it is up. Asked one by
one these were five Lua scripts, five round trips and five waits for the GIL on the
way back; a worker process is CPU-bound long before Plural or Redis are
(``bench/README.md``), so here they are two scripts.

The rules stay in their modules: each script is the ledger's, the breaker's and the
limiter's own Lua functions (``CLAIM_FN``, ``ALLOW_FN``, ``RESERVE_FN``, ``FINISH_FN``,
``DEFER_FN``, ``RECORD_SUCCESS_FN``) called in order, each asked only when the one
before said yes, as the separate calls were; each module's own methods run the same
functions alone. A pipeline would not do: redis-py sends ``SCRIPT EXISTS`` ahead of
every pipeline that holds a script, and the admission's questions depend on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.breaker import ALLOW_FN, RECORD_SUCCESS_FN, Gate, RedisCircuitBreaker, parse_gate
from worker.ledger import Claim, Ledger, parse_claim
from worker.ledger_lua import CLAIM_FN, DEFER_FN, FINISH_FN
from worker.ratelimit import RESERVE_FN, RedisRateLimiter, Reservation, parse_reservation

_SLICE = """
local function slice(t, i, j)
  local out = {}
  for n = i, j do out[#out + 1] = t[n] end
  return out
end
"""

# KEYS: [1-6] the claim's  [7-8] the breaker's  [9-10] the limiter's
# ARGV: [1-7] the claim's (ARGV[3] is now)  [8-9] allow's  [10-12] reserve's (rate, burst,
#       max_wait)  [13] max_wait for the breaker's probe
# Returns {claim} when the claim is refused or the cancel's retry budget is spent,
# {claim, gate} when the breaker says wait, else {claim, gate, reservation}.
ADMIT = CLAIM_FN + ALLOW_FN + RESERVE_FN + _SLICE + """
local c = claim(slice(KEYS, 1, 6), slice(ARGV, 1, 7))
if c[1] ~= 'claimed' or tonumber(c[3]) <= tonumber(ARGV[3]) then return {c} end
local g = allow(slice(KEYS, 7, 8), slice(ARGV, 8, 9))
if g[1] ~= 'closed' and g[1] ~= 'probe' then return {c, g} end
local a = slice(ARGV, 10, 12)
-- The probe must go through (nobody else calls Plural meanwhile), so it may wait longer.
if g[1] == 'probe' then a[3] = ARGV[13] end
return {c, g, reserve(slice(KEYS, 9, 10), a)}
"""

# KEYS: the ledger's finish or defer keys (ARGV[2] of them), then the breaker's 2 when ARGV[4] is not ''
# ARGV: [1] 'finish' or 'defer'  [2] number of ledger keys  [3] number of ledger args
#       [4] probe (0/1) for the breaker's success, or '' for none  [5..] the ledger's args
# Returns the attempts made.
SETTLE = FINISH_FN + DEFER_FN + RECORD_SUCCESS_FN + _SLICE + """
local nkeys, nargs = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] ~= '' then
  record_success(slice(KEYS, nkeys + 1, nkeys + 2), {ARGV[4]})
end
local write = finish
if ARGV[1] == 'defer' then write = defer end
return write(slice(KEYS, 1, nkeys), slice(ARGV, 5, 4 + nargs))
"""


@dataclass(frozen=True)
class Admission:
    """What :meth:`Attempts.admit` decided for one delivery."""

    claim: Claim
    gate: Gate | None = None
    """None when not asked: the claim was refused, or the retry budget is spent."""
    slot: Reservation | None = None
    """None when not asked: no gate, or the gate said wait."""


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
        """Claim the cancel for ``lease`` seconds, then ask the breaker, then reserve a slot at
        most ``max_wait`` seconds away (``probe_max_wait`` for the breaker's probe)."""
        claim_keys, claim_args = self.ledger.claim_call(request_id, payment_link_id, owner, lease)
        allow_keys, allow_args = self.breaker.allow_call()
        reserve_keys, reserve_args = self.limiter.reserve_call(max_wait)
        reply = self._admit(keys=[*claim_keys, *allow_keys, *reserve_keys],
                            args=[*claim_args, *allow_args, *reserve_args, repr(max(0.0, probe_max_wait))])
        claim = parse_claim(reply[0])
        gate = parse_gate(reply[1]) if len(reply) > 1 else None
        slot = parse_reservation(reply[2]) if len(reply) > 2 else None
        return Admission(claim, gate, slot)

    def finish(self, request_id: str, payment_link_id: str, owner: str, *, success_probe: bool | None,
               **fields: Any) -> int:
        """:meth:`Ledger.finish` with ``fields``, and the breaker's success when ``success_probe``
        is not None (its value says whether the call was the probe); returns the attempts made."""
        keys, args = self.ledger.finish_call(request_id, payment_link_id, owner, **fields)
        return self._run("finish", keys, args, success_probe)

    def defer(self, request_id: str, payment_link_id: str, owner: str, *, success_probe: bool | None,
              **fields: Any) -> int:
        """:meth:`Ledger.defer` with ``fields``, and the breaker's success as in :meth:`finish`."""
        keys, args = self.ledger.defer_call(request_id, payment_link_id, owner, **fields)
        return self._run("defer", keys, args, success_probe)

    def _run(self, write: str, keys: list[str], args: list[Any], success_probe: bool | None) -> int:
        ledger_keys, probe = len(keys), ""
        if success_probe is not None:
            breaker_keys, (probe,) = self.breaker.success_call(success_probe)
            keys = [*keys, *breaker_keys]
        return int(self._settle(keys=keys, args=[write, ledger_keys, len(args), probe, *args]))
