"""Redis's own clock for Lua scripts: the limiter and the breaker decide by it, so the
clocks of the hosts that run workers cannot skew them; and how far this host's clock is
from it (:func:`clock_offset`), since Plural sees this host's clock in every
``Request-Timestamp``.

Redis 7 replicates scripts by their effects (verbatim replication is gone), so a
script may call TIME, which is non-deterministic, and still write afterwards. Times
are epoch seconds as doubles; they travel as strings because Redis would truncate a
Lua number to an integer.
"""

from plural_cancel.worker.lua import Lua

REDIS_NOW = Lua("""
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
""")
"""Lua prelude: ``redis_now()`` (epoch seconds from Redis) and ``fmt(x)`` (six decimals)."""


CLOCK_OFFSET_LIMIT = 2.0
"""Seconds this host's clock may be off Redis's before it is reported (``plural-cancel
check`` fails, the worker warns): NTP keeps hosts within milliseconds, so more is a host
whose clock is wrong, and Plural sees it in every ``Request-Timestamp``."""


def clock_offset(client, clock=None) -> float:
    """Seconds this host's clock (``clock``, ``time.time`` by default) is ahead of Redis's
    (negative: behind), to within half a round trip of ``client`` (a ``redis.Redis``)."""
    import time

    clock = clock or time.time
    before = clock()
    seconds, micros = client.time()
    after = clock()
    return (before + after) / 2 - (seconds + micros / 1e6)
