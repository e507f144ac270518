"""A circuit breaker in Redis, shared by every worker process and host.

After ``threshold`` consecutive retryable failures (5xx, 429, timeouts, resets) the
breaker *opens*: nobody calls Plural until ``cooldown`` seconds have passed. Then it is
*half open*: exactly one caller at a time is let through as a probe (a lock with a
TTL, so a probe whose process died frees it). A probe that succeeds closes the
breaker; one that fails opens it again with the cooldown doubled, up to a cap.

Every transition is one Lua script that reads Redis's own clock (``TIME``), so the
hosts' clocks never enter a decision, and concurrent failures from many workers open
the breaker exactly once.

What the caller does (the cancel task, not this module):

- Ask :meth:`CircuitBreaker.allow` *before* the rate limiter, so a held-back cancel
  takes no slot.
- When not allowed, defer the cancel to ``retry_at`` without counting an attempt.
  Spread them: if every held-back cancel came due at the same instant, the limiter
  would refuse most of them and they would churn through deferral again. Due times
  such as ``retry_at + random() * backlog / rate`` let them return at about the pace
  the limiter will let them through.
- Report a probe's outcome with ``probe=True`` (the :class:`Gate` said so), and report
  "breaker opened" only when :meth:`CircuitBreaker.record_failure` returns True.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import redis

from worker.redis_clock import REDIS_NOW

MAX_COOLDOWN = 600.0
"""Seconds: a failed probe doubles the cooldown, but never beyond this."""
PROBE_TTL = 60.0
"""Seconds a probe may run before another caller may probe instead (it probably died)."""
PROBE_RETRY = 1.0
"""Seconds after which a caller turned away during a probe should ask again."""

_PRELUDE = REDIS_NOW

# KEYS: [1] breaker (hash)  [2] probe lock
# ARGV: [1] probe lock TTL (seconds)  [2] seconds others wait while a probe runs
# Returns {verdict, retry_in}: closed (go), probe (go, and report with probe=True),
# open (ask again in retry_in seconds, at the reopening time), probing (another caller
# probes). Seconds from now, not an instant: no host clock ever compares with Redis's.
# A function of (KEYS, ARGV) so that ``worker.attempts`` can run it in a larger script.
ALLOW_FN = _PRELUDE + """
local function allow(KEYS, ARGV)
  local b = redis.call('HMGET', KEYS[1], 'state', 'reopens_at')
  if b[1] ~= 'open' then return {'closed', '0'} end
  local now = redis_now()
  local reopens_at = tonumber(b[2])
  if now < reopens_at then return {'open', fmt(reopens_at - now)} end
  if redis.call('SET', KEYS[2], fmt(now), 'NX', 'PX', math.ceil(tonumber(ARGV[1]) * 1000)) then
    return {'probe', '0'}
  end
  return {'probing', ARGV[2]}
end
"""
ALLOW = ALLOW_FN + "return allow(KEYS, ARGV)\n"

# KEYS: [1] breaker (hash)  [2] probe lock
# ARGV: [1] probe (0/1)
# Returns 1 when this call closed the breaker.
# A function of (KEYS, ARGV) so that ``worker.attempts`` can run it in a larger script.
RECORD_SUCCESS_FN = """
local function record_success(KEYS, ARGV)
  if redis.call('HGET', KEYS[1], 'state') == 'open' then
    if ARGV[1] ~= '1' then
      -- A call that began before the breaker opened: only a probe decides recovery.
      return 0
    end
    -- Closed again, and the next opening starts from the base cooldown.
    redis.call('DEL', KEYS[1], KEYS[2])
    return 1
  end
  if tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0 then
    redis.call('HSET', KEYS[1], 'failures', 0)
  end
  return 0
end
"""
RECORD_SUCCESS = RECORD_SUCCESS_FN + "return record_success(KEYS, ARGV)\n"

# KEYS: [1] breaker (hash)  [2] probe lock
# ARGV: [1] probe (0/1)  [2] threshold  [3] base cooldown (seconds)  [4] max cooldown (seconds)
# Returns 1 exactly when this call opened a closed breaker.
# A function of (KEYS, ARGV) so that ``worker.attempts`` can run it in a larger script.
RECORD_FAILURE_FN = _PRELUDE + """
local function record_failure(KEYS, ARGV)
local now = redis_now()
local b = redis.call('HMGET', KEYS[1], 'state', 'reopens_at', 'cooldown')
if b[1] == 'open' then
  -- Only a probe's failure counts while open, and only once the cooldown has run out
  -- (a stale probe whose lock expired must not double the cooldown a second time).
  if ARGV[1] == '1' and now >= tonumber(b[2]) then
    local cooldown = math.min(tonumber(ARGV[4]), 2 * (tonumber(b[3]) or tonumber(ARGV[3])))
    redis.call('HSET', KEYS[1], 'opened_at', fmt(now), 'reopens_at', fmt(now + cooldown),
               'cooldown', fmt(cooldown))
    redis.call('DEL', KEYS[2])
  end
  return 0
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures < tonumber(ARGV[2]) then return 0 end
local cooldown = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', fmt(now), 'reopens_at', fmt(now + cooldown),
           'cooldown', fmt(cooldown))
redis.call('DEL', KEYS[2])
return 1
end
"""
RECORD_FAILURE = RECORD_FAILURE_FN + "return record_failure(KEYS, ARGV)\n"

# KEYS: [1] breaker (hash)  [2] probe lock
# Returns {state, failures, opened_at, reopens_at, cooldown, probing 0/1}.
STATE = _PRELUDE + """
local b = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at', 'reopens_at', 'cooldown')
local state = b[1] or 'closed'
if state == 'open' and redis_now() >= tonumber(b[4]) then state = 'half_open' end
return {state, b[2] or '0', b[3] or '', b[4] or '', b[5] or '', redis.call('EXISTS', KEYS[2])}
"""


class Gate(NamedTuple):
    """What :meth:`CircuitBreaker.allow` decided for one call."""

    allowed: bool
    """True: call Plural now."""
    probe: bool
    """True: this call is the one probe of a half-open breaker; report it with ``probe=True``."""
    retry_in: float
    """Seconds from now (by Redis's clock) after which to ask again when not allowed; 0 when allowed."""


class CircuitBreaker(Protocol):
    """Stops calls to Plural while it is failing, for every worker at once."""

    def allow(self) -> Gate:
        """May a call go now? See :class:`Gate`."""

    def record_success(self, probe: bool) -> None:
        """A call succeeded: a probe closes the breaker; any success resets the failure count."""

    def record_failure(self, probe: bool) -> bool:
        """A retryable failure; True exactly when this call opened the breaker."""

    def state(self) -> dict[str, Any]:
        """``{"state": "closed|open|half_open", "failures": n, "opened_at": epoch|None,
        "reopens_at": epoch|None, "cooldown": seconds|None, "probing": bool}``."""


class RedisCircuitBreaker:
    """The breaker's state in the hash ``key``; ``key + ":probe"`` is the probe lock.

    ``threshold`` consecutive failures open it for ``cooldown`` seconds; each failed
    probe doubles the cooldown up to ``max_cooldown`` seconds; a probe holds its lock
    for at most ``probe_ttl`` seconds; callers turned away while a probe runs are told
    to come back ``probe_retry`` seconds later.
    """

    def __init__(self, client: redis.Redis, key: str, threshold: int, cooldown: float, *,
                 max_cooldown: float = MAX_COOLDOWN, probe_ttl: float = PROBE_TTL,
                 probe_retry: float = PROBE_RETRY):
        if threshold < 1:
            raise ValueError("threshold must be at least 1 failure")
        if not cooldown > 0:
            raise ValueError("cooldown must be a positive number of seconds")
        self.redis = client
        self.key = key
        self.probe_key = f"{key}:probe"
        self.threshold = int(threshold)
        self.cooldown = float(cooldown)
        self.max_cooldown = max(float(max_cooldown), self.cooldown)
        self.probe_ttl = probe_ttl
        self.probe_retry = probe_retry
        self._allow = client.register_script(ALLOW)
        self._record_success = client.register_script(RECORD_SUCCESS)
        self._record_failure = client.register_script(RECORD_FAILURE)
        self._state = client.register_script(STATE)

    def allow(self) -> Gate:
        """Closed: allowed. Open: not allowed until the reopening time. Half open: one
        probe at a time is allowed; the others are told to ask again shortly."""
        keys, args = self.allow_call()
        return parse_gate(self._allow(keys=keys, args=args))

    def allow_call(self) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the allow script (``ALLOW_FN``), for :meth:`allow` and ``worker.attempts``."""
        return [self.key, self.probe_key], [repr(self.probe_ttl), repr(self.probe_retry)]

    def record_success(self, probe: bool) -> None:
        """A call succeeded. A probe's success closes the breaker and resets the cooldown;
        a success while closed resets the consecutive-failure count; any other success
        (a call begun before the breaker opened) changes nothing."""
        keys, args = self.success_call(probe)
        self._record_success(keys=keys, args=args)

    def success_call(self, probe: bool) -> tuple[list[str], list[int]]:
        """KEYS and ARGV of the success script (``RECORD_SUCCESS_FN``), for :meth:`record_success`
        and ``worker.attempts``."""
        return [self.key, self.probe_key], [int(bool(probe))]

    def record_failure(self, probe: bool) -> bool:
        """A retryable failure. Returns True only for the one call that opened a closed
        breaker (a failed probe re-opens it with a doubled cooldown, returning False:
        the opening was reported already). Failures of calls begun before the breaker
        opened change nothing."""
        keys, args = self.failure_call(probe)
        return bool(int(self._record_failure(keys=keys, args=args)))

    def failure_call(self, probe: bool) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the failure script (``RECORD_FAILURE_FN``), for :meth:`record_failure`
        and ``worker.attempts``."""
        return [self.key, self.probe_key], [int(bool(probe)), self.threshold, repr(self.cooldown),
                                            repr(self.max_cooldown)]

    def state(self) -> dict[str, Any]:
        """The breaker for stats; times are epoch seconds from Redis's clock."""
        state, failures, opened_at, reopens_at, cooldown, probing = self._state(keys=[self.key, self.probe_key])
        number = lambda raw: float(raw) if _text(raw) else None  # noqa: E731
        return {"state": _text(state), "failures": int(failures), "opened_at": number(opened_at),
                "reopens_at": number(reopens_at), "cooldown": number(cooldown), "probing": bool(int(probing))}


def parse_gate(reply: list) -> Gate:
    """The :class:`Gate` an allow script (``ALLOW_FN``) answered."""
    verdict, retry_in = _text(reply[0]), reply[1]
    if verdict == "closed":
        return Gate(True, False, 0.0)
    if verdict == "probe":
        return Gate(True, True, 0.0)
    return Gate(False, False, float(retry_in))


class NoBreaker:
    """A stub for tests and for running without a breaker: always closed."""

    def allow(self) -> Gate:
        return Gate(True, False, 0.0)

    def record_success(self, probe: bool) -> None:
        pass

    def record_failure(self, probe: bool) -> bool:
        return False

    def state(self) -> dict[str, Any]:
        return {"state": "closed", "failures": 0, "opened_at": None, "reopens_at": None,
                "cooldown": None, "probing": False}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
