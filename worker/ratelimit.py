"""One rate limit for calls to Plural, shared by every worker process and host.

The limiter is GCRA (the generic cell rate algorithm) kept in Redis: one number, the
*theoretical arrival time* (TAT) of the next free slot. Slots are ``1 / rate`` seconds
apart; ``burst`` slots may be taken ahead of the steady pace. A caller *reserves* the
next free slot when it is at most ``max_wait`` seconds away and sleeps until it, so a
backlog drains at exactly the rate (every slot is used, none is shared); when the next
slot is further away the caller takes nothing and learns how long to wait, so it can
defer the cancel instead of holding a worker slot.

Every decision is taken inside one Lua script that reads Redis's own clock
(``TIME``): the hosts' clocks never enter it, so skew between them cannot break the
limit. The Python side reads no clock at all.

After a 429 (:meth:`RateLimiter.penalize`) the effective rate drops and then climbs
back linearly; the slow-down is a hash beside the TAT, applied by the same script,
so every worker slows down together.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import redis

from plural_cancel.worker.redis_clock import REDIS_NOW

MIN_FACTOR = 0.1
"""Repeated 429s compound the slow-down, but never below this fraction of the rate."""

PENALTY_HOLDOFF = 1.0
"""Seconds after a penalty during which further 429s do not compound it: calls already
in flight when Plural first said 429 are the same signal, not new ones."""

_PRELUDE = REDIS_NOW + """-- The fraction of the full rate allowed now: the penalty's factor, climbing back
-- linearly to 1 over its recovery seconds.
local function rate_factor(penalty_key, now)
  local p = redis.call('HMGET', penalty_key, 'factor', 'at', 'seconds')
  if not p[1] then return 1 end
  local factor, at, seconds = tonumber(p[1]), tonumber(p[2]), tonumber(p[3])
  local elapsed = math.max(0, now - at)
  if elapsed >= seconds then return 1 end
  return factor + (1 - factor) * elapsed / seconds
end
"""

# KEYS: [1] TAT (string)  [2] penalty (hash)
# ARGV: [1] rate (per second)  [2] burst (slots)  [3] max_wait (seconds)
# Returns {granted 0/1, wait seconds}: granted → the slot is the caller's, `wait` from
# now; refused → nothing was taken, `wait` is how far away the next free slot is.
# A function of (KEYS, ARGV) so that ``worker.attempts`` can run it in a larger script.
RESERVE_FN = _PRELUDE + """
local function reserve(KEYS, ARGV)
  local now = redis_now()
  local interval = 1 / (tonumber(ARGV[1]) * rate_factor(KEYS[2], now))
  local tolerance = tonumber(ARGV[2]) * interval
  local tat = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0') or 0)
  local wait = math.max(0, tat - tolerance - now)
  if wait > tonumber(ARGV[3]) then
    return {0, fmt(wait)}
  end
  local new_tat = tat + interval
  -- Once Redis's clock passes the TAT the key means nothing more: let it expire.
  redis.call('SET', KEYS[1], fmt(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
  return {1, fmt(wait)}
end
"""

# KEYS: [1] penalty (hash)
# ARGV: [1] factor (0-1]  [2] recovery seconds  [3] floor factor  [4] holdoff seconds
# Returns the factor in force after this call.
# A function of (KEYS, ARGV) so that ``worker.attempts`` can run it in a larger script.
PENALIZE_FN = _PRELUDE + """
local function penalize(KEYS, ARGV)
local now = redis_now()
local current = rate_factor(KEYS[1], now)
local last = redis.call('HGET', KEYS[1], 'at')
if last and now - tonumber(last) < tonumber(ARGV[4]) then
  return fmt(current)
end
local factor = math.max(tonumber(ARGV[3]), current * tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'factor', fmt(factor), 'at', fmt(now), 'seconds', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return fmt(factor)
end
"""

# KEYS: [1] penalty (hash)
# ARGV: [1] rate (per second)
# Returns the effective rate (per second) now.
EFFECTIVE_RATE = _PRELUDE + """
return fmt(tonumber(ARGV[1]) * rate_factor(KEYS[1], redis_now()))
"""


class Reservation(NamedTuple):
    """What a reservation (``RESERVE_FN``) decided."""

    granted: bool
    """True: a slot is the caller's; it sleeps ``wait`` seconds, then calls Plural."""
    wait: float
    """Seconds. Granted: until the reserved slot (0 <= wait <= max_wait). Refused: until
    the next slot would be free, for deferring the cancel; nothing was taken."""


class RedisRateLimiter:
    """GCRA in Redis: ``rate`` calls per second across all processes, plus ``burst`` at once.

    From idle, ``burst + 1`` calls may go at once (the steady one and ``burst`` above
    it); after that calls are ``1 / rate`` seconds apart. With ``burst=0`` no 1-second
    window holds more than ``rate`` calls, give or take one at its edges; in general
    no more than ``rate + burst``.

    ``key`` holds the TAT; ``key + ":penalty"`` holds the 429 slow-down.
    """

    def __init__(self, client: redis.Redis, key: str, rate: float, burst: int = 0, *,
                 min_factor: float = MIN_FACTOR, penalty_holdoff: float = PENALTY_HOLDOFF):
        if not rate > 0:
            raise ValueError("rate must be a positive number of calls per second")
        if burst < 0:
            raise ValueError("burst must be a non-negative number of calls")
        if not 0 < min_factor <= 1:
            raise ValueError("min_factor must be in (0, 1]")
        self.redis = client
        self.key = key
        self.penalty_key = f"{key}:penalty"
        self.rate = float(rate)
        self.burst = int(burst)
        self.min_factor = min_factor
        self.penalty_holdoff = penalty_holdoff
        self._effective_rate = client.register_script(EFFECTIVE_RATE)

    def reserve_call(self, max_wait: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the reserve script (``RESERVE_FN``), for ``worker.attempts``: take the
        next free slot if it is at most ``max_wait`` seconds away (see :class:`Reservation`)."""
        return [self.key, self.penalty_key], [repr(self.rate), self.burst, repr(max(0.0, max_wait))]

    def penalize_call(self, factor: float = 0.5, seconds: float = 60.0) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the penalty script (``PENALIZE_FN``), for ``worker.attempts``: after a
        429 the rate drops to ``rate * factor`` and climbs back over ``seconds``. A 429 that
        comes while an earlier penalty is still recovering compounds it (0.5 then 0.5 again
        is a quarter of the rate, down to ``min_factor``), except within ``penalty_holdoff``
        seconds of the last one."""
        if not 0 < factor <= 1:
            raise ValueError("factor must be in (0, 1]")
        if not seconds > 0:
            raise ValueError("seconds must be positive")
        return [self.penalty_key], [repr(factor), repr(seconds), repr(self.min_factor), repr(self.penalty_holdoff)]

    def effective_rate(self) -> float:
        """Calls per second allowed right now, after any 429 slow-down."""
        return float(self._effective_rate(keys=[self.penalty_key], args=[repr(self.rate)]))


def parse_reservation(reply: list) -> Reservation:
    """The :class:`Reservation` a reserve script (``RESERVE_FN``) answered."""
    granted, wait = reply
    return Reservation(bool(int(granted)), float(wait))
