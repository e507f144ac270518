"""A circuit breaker in Redis, shared by every worker process and host: it opens on an
outage, never on one bad link.

The rule (resilience4j's time-based window with ``minimumNumberOfCalls`` and
``failureRateThreshold``, counted in links rather than calls):

    Over the last ``window`` seconds, look at each payment link called and its latest
    outcome. The breaker opens when at least ``min_links`` distinct links ended their
    latest call with an outage-like failure (5xx, timeout, reset, unreachable, an answer
    that is not Plural's), and those are at least ``failure_rate`` of all links called.

Why links and not calls: a link that fails on every call (a "poison" link Plural cannot
handle) retries again and again; counted by calls, as Hystrix and resilience4j count,
its retries alone would fill the window and open the breaker for the whole fleet. Counted
by links, one link is one voice however often it retries, so ``min_links`` >= 2 means
no single link can ever open the breaker, at any traffic level. The minimum keeps a few
unlucky calls at low traffic from stopping everything; the rate keeps one bad minute of
several links from stopping a fleet whose other calls succeed.

What is not evidence of an outage: a 429 (a throttle: the limiter slows down and
``Retry-After`` is honoured), a token that could not be had because another process
held the refresh (Plural was never asked), a 4xx in Plural's own words (Plural is up
and answering). A 429 or no-news result of a probe frees the probe slot and leaves the
breaker as it was.

Once open, nobody calls Plural until ``cooldown`` seconds have passed. Then it is half
open: exactly one caller at a time is let through as a probe (a lock with a TTL, so a
probe whose process died frees it). A probe that succeeds closes the breaker and the
cooldown starts again from its base; one that fails opens it again with the cooldown
doubled, up to a cap.

Every transition is one Lua script that reads Redis's own clock (``TIME``), so the
hosts' clocks never enter a decision, and concurrent failures from many workers open
the breaker exactly once. The cancel task reaches these scripts through
``worker.attempts``, in the same round trips as its ledger writes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import redis

from plural_cancel.errors import PluralBadResponse, PluralRateLimited, TokenUnavailable
from plural_cancel.worker.lua import Lua, script
from plural_cancel.worker.policy import retryable
from plural_cancel.worker.redis_clock import REDIS_NOW

MAX_COOLDOWN = 600.0
"""Seconds: a failed probe doubles the cooldown, but never beyond this."""
PROBE_TTL = 60.0
"""Seconds a probe may run before another caller may probe instead (it probably died)."""
PROBE_RETRY = 1.0
"""Seconds after which a caller turned away during a probe should ask again."""

SUCCESS, FAILURE, NO_NEWS = "success", "failure", ""
"""What a call showed of Plural: it answered, it failed like an outage, or nothing."""


def news(error: BaseException | None, *, unsettled: bool) -> str:
    """What one attempt showed of Plural's health: the one home of "what counts as an
    outage" (the module's docstring). ``error``: what went wrong, if anything;
    ``unsettled``: the attempt settled nothing and will be tried again
    (``worker.policy.unsettled``)."""
    if isinstance(error, (TokenUnavailable, PluralRateLimited)):
        # The token endpoint was never asked (another process held the refresh), or Plural
        # said "slower": a throttle is the pace's news (``worker.pace``), not an outage.
        return NO_NEWS
    if unsettled and (isinstance(error, PluralBadResponse) or retryable(error)):
        # A 5xx, no answer, or one that is not Plural's (a maintenance page).
        return FAILURE
    # Any other answer (including a 4xx in Plural's words) shows Plural is up.
    return SUCCESS


# KEYS: [1] breaker (hash)  [2] probe lock
# ARGV: [1] probe lock TTL (seconds)  [2] seconds others wait while a probe runs
#       [3] the asking delivery's owner token (the probe lock's value)
# Returns {verdict, retry_in}: closed (go), probe (go, and report with probe=True),
# open (ask again in retry_in seconds, at the reopening time), probing (another caller
# probes). Seconds from now, not an instant: no host clock ever compares with Redis's.
# A function of (K, A), its KEYS and ARGV, so that ``worker.attempts`` can run it in a larger script.
ALLOW_FN = Lua("""
local function allow(K, A)
  local breaker, probe_lock = K[1], K[2]
  local probe_ttl, probe_retry, owner = tonumber(A[1]), A[2], A[3]
  local b = redis.call('HMGET', breaker, 'state', 'reopens_at')
  if b[1] ~= 'open' then return {'closed', '0'} end
  local now = redis_now()
  local reopens_at = tonumber(b[2])
  if now < reopens_at then return {'open', fmt(reopens_at - now)} end
  if redis.call('SET', probe_lock, owner, 'NX', 'PX', math.ceil(probe_ttl * 1000)) then
    return {'probe', '0'}
  end
  return {'probing', probe_retry}
end
""", needs=(REDIS_NOW,))

# KEYS: [1] breaker (hash)  [2] probe lock  [3] links called (zset: link -> time of its
#       latest outcome)  [4] links failing (zset: link -> time, while its latest failed)
# ARGV: [1] 'success', 'failure' or '' (no news)  [2] probe (0/1)  [3] owner token
#       [4] payment link id  [5] window (seconds)  [6] min links  [7] failure rate (0-1]
#       [8] base cooldown (seconds)  [9] max cooldown (seconds)
# Returns 1 exactly when this call opened a closed breaker.
# A function of (K, A), its KEYS and ARGV, so that ``worker.attempts`` can run it in a larger script.
RECORD_FN = Lua("""
local function record(K, A)
  local breaker, probe_lock, called, failing_links = K[1], K[2], K[3], K[4]
  local outcome, probe, owner, link_id = A[1], A[2] == '1', A[3], A[4]
  local window, min_links, failure_rate = tonumber(A[5]), tonumber(A[6]), tonumber(A[7])
  local base_cooldown, max_cooldown = tonumber(A[8]), tonumber(A[9])
  local now = redis_now()
  local b = redis.call('HMGET', breaker, 'state', 'reopens_at', 'cooldown')
  if b[1] == 'open' then
    -- Only the probe's outcome counts while open: calls begun before it opened say nothing
    -- of now. A stale probe (its lock expired) still counts a success (Plural answered),
    -- but not a failure before the reopening time (it must not double the cooldown twice).
    if not probe then return 0 end
    if outcome == 'success' then
      -- Closed again, with an empty window and the next opening from the base cooldown.
      redis.call('DEL', breaker, probe_lock, called, failing_links)
    elseif outcome == 'failure' and now >= tonumber(b[2]) then
      local cooldown = math.min(max_cooldown, 2 * (tonumber(b[3]) or base_cooldown))
      redis.call('HSET', breaker, 'opened_at', fmt(now), 'reopens_at', fmt(now + cooldown),
                 'cooldown', fmt(cooldown))
      redis.call('DEL', probe_lock)
    elseif outcome == '' and redis.call('GET', probe_lock) == owner then
      -- A throttled or held probe learnt nothing: free the slot for the next caller.
      redis.call('DEL', probe_lock)
    end
    return 0
  end
  if outcome == '' then return 0 end
  local horizon = now - window
  -- Trimmed on every call: under steady success the window's links must not pile up.
  redis.call('ZREMRANGEBYSCORE', called, '-inf', horizon)
  redis.call('ZADD', called, now, link_id)
  local ttl = math.ceil(window * 2000)
  redis.call('PEXPIRE', called, ttl)
  if outcome == 'success' then
    -- The failing set only grows on failures, so it is trimmed there (and read by ZCOUNT).
    redis.call('ZREM', failing_links, link_id)
    return 0
  end
  redis.call('ZREMRANGEBYSCORE', failing_links, '-inf', horizon)
  redis.call('ZADD', failing_links, now, link_id)
  redis.call('PEXPIRE', failing_links, ttl)
  local failing = redis.call('ZCARD', failing_links)
  if failing < min_links then return 0 end
  if failing < failure_rate * redis.call('ZCARD', called) then return 0 end
  local cooldown = base_cooldown
  -- ``open_since``: this first opening, which a failed probe's re-opening (a new ``opened_at``)
  -- leaves alone; it goes with the hash when a probe closes the breaker.
  redis.call('HSET', breaker, 'state', 'open', 'opened_at', fmt(now), 'reopens_at', fmt(now + cooldown),
             'cooldown', fmt(cooldown), 'failing_links', failing, 'open_since', fmt(now))
  redis.call('DEL', probe_lock, called, failing_links)
  return 1
end
""", needs=(REDIS_NOW,))

# KEYS: [1] breaker (hash)  [2] probe lock  [3] links called  [4] links failing
# ARGV: [1] window (seconds)
# Returns {state, opened_at, reopens_at, cooldown, probing 0/1, links called, links failing,
# open_since, seconds open}: the last two '' and 0 while closed.
STATE = script(REDIS_NOW, """
local breaker, probe_lock, called, failing_links = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local window = tonumber(ARGV[1])
local b = redis.call('HMGET', breaker, 'state', 'opened_at', 'reopens_at', 'cooldown', 'open_since')
local state = b[1] or 'closed'
local now = redis_now()
if state == 'open' and now >= tonumber(b[3]) then state = 'half_open' end
local horizon = '(' .. fmt(now - window)
-- A breaker opened before ``open_since`` was written has only its latest opening to go by.
local since = b[5] or (state ~= 'closed' and b[2]) or ''
local open_for = '0'
if since ~= '' then open_for = fmt(math.max(0, now - tonumber(since))) end
return {state, b[2] or '', b[3] or '', b[4] or '', redis.call('EXISTS', probe_lock),
        redis.call('ZCOUNT', called, horizon, '+inf'), redis.call('ZCOUNT', failing_links, horizon, '+inf'),
        since, open_for}
""")


class Gate(NamedTuple):
    """What the breaker decided for one call."""

    allowed: bool
    """True: call Plural now."""
    probe: bool
    """True: this call is the one probe of a half-open breaker; report it with ``probe=True``."""
    retry_in: float
    """Seconds from now (by Redis's clock) after which to ask again when not allowed; 0 when allowed."""


class RedisCircuitBreaker:
    """The breaker's state in the hash ``key``; beside it ``:probe`` (the probe lock),
    ``:called`` and ``:failing`` (the window's links).

    ``window``: seconds of outcomes looked at; ``min_links`` (at least 2): distinct links
    whose latest call failed that it takes to open; ``failure_rate``: the share of the
    window's links those must be; ``cooldown``: seconds it stays open at first, doubled by
    each failed probe up to ``max_cooldown``; a probe holds its lock at most ``probe_ttl``
    seconds; callers turned away while a probe runs come back ``probe_retry`` seconds later.
    """

    def __init__(self, client: redis.Redis, key: str, *, window: float, min_links: int, failure_rate: float,
                 cooldown: float, max_cooldown: float = MAX_COOLDOWN, probe_ttl: float = PROBE_TTL,
                 probe_retry: float = PROBE_RETRY):
        if min_links < 2:
            raise ValueError("min_links must be at least 2, so that one link can never open the breaker")
        if not 0 < failure_rate <= 1:
            raise ValueError("failure_rate must be above 0 and at most 1")
        if not window > 0 or not cooldown > 0:
            raise ValueError("window and cooldown must be positive numbers of seconds")
        self.redis = client
        self.keys = [key, f"{key}:probe", f"{key}:called", f"{key}:failing"]
        self.window = float(window)
        self.min_links = int(min_links)
        self.failure_rate = float(failure_rate)
        self.cooldown = float(cooldown)
        self.max_cooldown = max(float(max_cooldown), self.cooldown)
        self.probe_ttl = probe_ttl
        self.probe_retry = probe_retry
        self._state = client.register_script(STATE)

    @classmethod
    def from_settings(cls, client: redis.Redis, key: str, settings) -> "RedisCircuitBreaker":
        """The breaker ``config.settings.Settings`` describes (``BREAKER_*``)."""
        return cls(client, key, window=settings.breaker_window, min_links=settings.breaker_min_links,
                   failure_rate=settings.breaker_failure_rate, cooldown=settings.breaker_cooldown)

    def allow_call(self, owner: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the allow script (``ALLOW_FN``), for ``worker.attempts``. Closed: allowed.
        Open: not allowed until the reopening time. Half open: one probe at a time (``owner``
        holds the probe lock) is allowed; the others are told to ask again shortly."""
        return self.keys[:2], [repr(self.probe_ttl), repr(self.probe_retry), owner]

    def record_call(self, outcome: str, payment_link_id: str, *, probe: bool,
                    owner: str) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the record script (``RECORD_FN``), for ``worker.attempts``: what a call to
        ``payment_link_id`` showed, :data:`SUCCESS`, :data:`FAILURE` or :data:`NO_NEWS`. It
        answers 1 only for the one failure that opened a closed breaker (a failed probe
        re-opens it with a doubled cooldown and answers 0: the opening was reported already)."""
        if outcome not in (SUCCESS, FAILURE, NO_NEWS):
            raise ValueError(f"outcome must be success, failure or '', not {outcome!r}")
        return list(self.keys), [outcome, int(bool(probe)), owner, payment_link_id, repr(self.window),
                                 self.min_links, repr(self.failure_rate), repr(self.cooldown),
                                 repr(self.max_cooldown)]

    def state(self) -> dict[str, Any]:
        """The breaker for stats: ``{"state": "closed|open|half_open", "opened_at", "reopens_at"
        (epoch seconds by Redis's clock, or None), "cooldown" (seconds or None), "probing",
        "links_called", "links_failing" (in the window now), "open_since" (its first opening
        since it was last closed: a failed probe re-opens it, a new ``opened_at``, and leaves this
        alone; None while closed), "open_seconds" (seconds since then by Redis's clock; 0 while
        closed)}``."""
        return parse_state(self._state(*self.state_call()))

    def state_call(self) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the state script (``STATE``), for reading many breakers in one
        pipeline (the metrics); its reply is :func:`parse_state`'s."""
        return self.keys, [repr(self.window)]


def parse_state(reply: list) -> dict[str, Any]:
    """:meth:`RedisCircuitBreaker.state` from the state script's (``STATE``) reply."""
    state, opened_at, reopens_at, cooldown, probing, called, failing, since, open_for = reply
    number = lambda raw: float(raw) if _text(raw) else None  # noqa: E731
    return {"state": _text(state), "opened_at": number(opened_at), "reopens_at": number(reopens_at),
            "cooldown": number(cooldown), "probing": bool(int(probing)), "links_called": int(called),
            "links_failing": int(failing), "open_since": number(since), "open_seconds": float(open_for)}


def parse_gate(reply: list) -> Gate:
    """The :class:`Gate` an allow script (``ALLOW_FN``) answered."""
    verdict, retry_in = _text(reply[0]), reply[1]
    if verdict == "closed":
        return Gate(True, False, 0.0)
    if verdict == "probe":
        return Gate(True, True, 0.0)
    return Gate(False, False, float(retry_in))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
