"""Redis's own clock for Lua scripts: the limiter and the breaker decide by it, so the
clocks of the hosts that run workers cannot skew them.

Redis 7 replicates scripts by their effects (verbatim replication is gone), so a
script may call TIME, which is non-deterministic, and still write afterwards. Times
are epoch seconds as doubles; they travel as strings because Redis would truncate a
Lua number to an integer.
"""

REDIS_NOW = """
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
"""
"""Lua prelude: ``redis_now()`` (epoch seconds from Redis) and ``fmt(x)`` (six decimals)."""
