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

How fast slots come is the pace (``worker.pace``): ``rate`` until Plural throttles a
share of calls that noise would not explain, then what Plural accepts, climbing back;
a hash beside the TAT, read by the same script, so every worker keeps one pace.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import redis

from plural_cancel.worker import pace
from plural_cancel.worker.lua import Lua
from plural_cancel.worker.pace import PACE_FN
from plural_cancel.worker.redis_clock import REDIS_NOW

# KEYS: [1] TAT (string)  [2] pace (hash, ``worker.pace``)
# ARGV: [1] rate (per second)  [2] burst (slots)  [3] max_wait (seconds)
# Returns {granted 0/1, wait seconds, now}: granted → the slot is the caller's, `wait` from
# `now` (epoch seconds, Redis's clock: when the slot was granted, at the pace then in force);
# refused → nothing was taken, `wait` is how far away the next free slot is.
# A function of (K, A), its KEYS and ARGV, so that ``worker.attempts`` can run it in a larger script.
RESERVE_FN = Lua("""
local function reserve(K, A)
  local tat_key, pace_key = K[1], K[2]
  local rate, burst, max_wait = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
  local now = redis_now()
  local interval = 1 / pace_rate(pace_key, rate, now)
  local tolerance = burst * interval
  local tat = math.max(now, tonumber(redis.call('GET', tat_key) or '0') or 0)
  local wait = math.max(0, tat - tolerance - now)
  if wait > max_wait then
    return {0, fmt(wait), fmt(now)}
  end
  local new_tat = tat + interval
  -- Once Redis's clock passes the TAT the key means nothing more: let it expire.
  redis.call('SET', tat_key, fmt(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
  return {1, fmt(wait), fmt(now)}
end
""", needs=(REDIS_NOW, PACE_FN))

# KEYS: [1] pace (hash)
# ARGV: [1] rate (per second)  [2] throttled (0/1)  [3] when the call's slot was granted (epoch seconds)
# Returns 1 when this answer cut the pace (``worker.pace``).
# A function of (K, A), its KEYS and ARGV, so that ``worker.attempts`` can run it in a larger script.
OBSERVE_FN = Lua("""
local function observe(K, A)
  local pace_key = K[1]
  local rate, throttled, sent_at = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
  return pace_observe(pace_key, rate, redis_now(), throttled, sent_at)
end
""", needs=(REDIS_NOW, PACE_FN))


class Reservation(NamedTuple):
    """What a reservation (``RESERVE_FN``) decided."""

    granted: bool
    """True: a slot is the caller's; it sleeps ``wait`` seconds, then calls Plural."""
    wait: float
    """Seconds. Granted: until the reserved slot (0 <= wait <= max_wait). Refused: until
    the next slot would be free, for deferring the cancel; nothing was taken."""
    at: float = 0.0
    """When it was decided, epoch seconds of Redis's clock: a call whose slot was granted
    before the pace's last cut went at the old pace, and says nothing of the new one."""


class RedisRateLimiter:
    """GCRA in Redis: ``rate`` calls per second across all processes, plus ``burst`` at once,
    at the pace ``worker.pace`` keeps (never above ``rate``).

    From idle, ``burst + 1`` calls may go at once (the steady one and ``burst`` above
    it); after that calls are ``1 / rate`` seconds apart. With ``burst=0`` no 1-second
    window holds more than ``rate`` calls, give or take one at its edges; in general
    no more than ``rate + burst``.

    ``key`` holds the TAT; ``key + ":pace"`` the pace.
    """

    def __init__(self, client: redis.Redis, key: str, rate: float, burst: int = 0):
        if not rate > 0:
            raise ValueError("rate must be a positive number of calls per second")
        if burst < 0:
            raise ValueError("burst must be a non-negative number of calls")
        self.redis = client
        self.key = key
        self.pace_key = f"{key}:pace"
        self.rate = float(rate)
        self.burst = int(burst)

    def reserve_call(self, max_wait: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the reserve script (``RESERVE_FN``), for ``worker.attempts``: take the
        next free slot if it is at most ``max_wait`` seconds away (see :class:`Reservation`)."""
        return [self.key, self.pace_key], [repr(self.rate), self.burst, repr(max(0.0, max_wait))]

    def observe_call(self, throttled: bool, sent_at: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the pace's observation (``OBSERVE_FN``), for ``worker.attempts``: one
        call Plural answered, ``throttled`` or not, whose slot was granted at ``sent_at``
        (``Reservation.at``)."""
        return [self.pace_key], [repr(self.rate), int(throttled), repr(sent_at)]

    def pace(self) -> tuple[float, float]:
        """(calls per second granted now, the share of recent calls Plural throttled)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.pace_key)
        pipe.time()
        fields, (seconds, micros) = pipe.execute()
        return self.pace_at(fields, seconds + micros / 1e6)

    def pace_at(self, fields: dict, now: float) -> tuple[float, float]:
        """:meth:`pace` from the pace hash's fields (``HGETALL`` of :attr:`pace_key`) read at
        ``now`` (epoch seconds, Redis's clock): for reading many limiters in one pipeline."""
        state = pace.from_fields({k.decode(): v.decode() for k, v in fields.items()})
        return pace.rate(state, self.rate, now), pace.share(state, now)

    def effective_rate(self) -> float:
        """Calls per second granted right now."""
        return self.pace()[0]


def parse_reservation(reply: list) -> Reservation:
    """The :class:`Reservation` a reserve script (``RESERVE_FN``) answered."""
    granted, wait, at = reply
    return Reservation(bool(int(granted)), float(wait), float(at))
