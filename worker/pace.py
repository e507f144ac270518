"""The fleet's pace to Plural: how fast the limiter grants slots, from the share of calls
Plural throttles.

A 429 (or a 4xx in Plural's words for a rate limit) says "slower", not "down", and one
429 among many accepted calls is noise. So the pace follows the *share* of calls
throttled, over the last few seconds of calls from every worker and host, kept in Redis
and judged on Redis's clock (the Google SRE book's "Handling Overload": decide from
the ratio of accepted to sent calls, so occasional rejections cost nothing):

- **When to cut.** Calls and throttles are counted with weights that halve every
  ``WINDOW * ln 2`` seconds (an exponentially weighted window of about ``WINDOW`` s).
  The pace is cut when, over at least ``MIN_CALLS`` calls, more were throttled than
  ``NOISE`` (5 %) of them plus ``CONFIDENCE`` (3) standard deviations: a share that
  random throttling at 5 % would reach about once in 700 windows. At 10 calls a second
  that is 4 throttled of the last 20 (20 %); at 100 a second, 20 of the last 200 (10 %).
  A lone 429, or 5 % at random, never cuts.
- **How far.** To ``BETA`` (0.9) of what Plural accepts (never above the pace it cuts):
  the most it accepted in one whole second of the last ``PEAK_SECONDS`` in which the fleet
  sent at least ``FULL`` of its pace (a Plural whose own limit is below ours accepts its
  limit each second and throttles the rest, so that count is its limit; and a second of
  random 429s below its limit still counts all that was sent, so noise never reads as a
  lower limit); without such a second (the first of a drain, which rarely starts on a
  boundary, or still gathering speed), the most it accepted in any second or the share of
  the current pace that got through, whichever is more. Never
  below ``FLOOR`` of ours. Calls sent before a cut say nothing of the pace after it, and the
  counts start afresh: a storm of 429s from every worker at once is one cut.
- **Climbing back.** As CUBIC (TCP's, and botocore's adaptive retry mode's): from the cut
  the pace rises quickly, then levels off at ``LEVEL`` (0.97) of what Plural accepted (in
  ``cbrt(accepted * (LEVEL - BETA) / (GROWTH * limit))`` seconds: 3.4 s at a Plural limit
  of 6/s with ours at 10/s, the same at 60/100), holds there ``HOLD`` (8) seconds, then
  probes above it, gently at first (``PROBE_GROWTH``, under a third of the climb's: a
  probe that finds the same limit costs a few throttled calls, not a burst), faster the
  longer nothing throttles, up to ``PLURAL_RATE_LIMIT``: never above it.

``Pace``, :func:`rate` and :func:`observe` are the rule in Python, on a clock the caller
passes; ``PACE_FN`` is the same rule in Lua, run by the limiter's scripts on Redis's
clock (``tests/test_pace.py`` holds the two to each other). The Python copy also serves
``plural-cancel stats`` and the metrics, which read the state and judge it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from plural_cancel.worker.lua import Lua
from plural_cancel.worker.redis_clock import REDIS_NOW

WINDOW = 2.0
"""Seconds: the time constant of the weighted window of calls and throttles."""
MIN_CALLS = 10
"""Weighted calls the window must hold before the share of throttles can cut the pace."""
NOISE = 0.05
"""Share of calls Plural may throttle at random without it being taken for a lower limit."""
CONFIDENCE = 3.0
"""Standard deviations above ``NOISE`` that the throttled calls must reach to cut."""
BETA = 0.9
"""A cut sets the pace to this share of what Plural accepted in its busiest recent second."""
LEVEL = 0.97
"""The climb levels off at this share of what Plural accepted: at its very limit, the
jitter of calls on their way (threads waking, hosts' schedulers) puts some over it."""
PEAK_SECONDS = 3
"""Whole seconds of accepted calls a cut looks back over for the busiest."""
HOLD = 8.0
"""Seconds the climb holds at its level before it probes above it: a Plural whose own limit
is below ours is probed every twenty seconds or so, not every few (each probe costs a few
throttled calls)."""
GROWTH = 0.001
"""The climb's cubic coefficient, as a share of the limit per second cubed."""
PROBE_GROWTH = 0.0003
"""The probe's, above the level: at 10/s with Plural at 6/s, a probe at GROWTH sent 8-9 calls
a second before the share of 429s said "over" (about ten throttled: a fifth of a 10-s
window); at this it ends nearer 7 (``bench/README.md``). A Plural whose limit came back
to ours is reached about 20 s after the cut."""
FLOOR = 0.1
"""The lowest pace, as a share of the limit."""
FULL = 0.8
"""A second in which the fleet sent at least this share of its pace is one it was pushing
Plural in: what Plural accepted of it, throttling the rest, is its limit."""


@dataclass(frozen=True)
class Pace:
    """The controller's state (one Redis hash, ``Keys.pace``). Times are epoch seconds."""

    calls: float = 0.0
    """Weighted calls since the last cut."""
    throttled: float = 0.0
    """Weighted throttled calls since the last cut."""
    at: float = 0.0
    """When ``calls`` and ``throttled`` were last weighted."""
    cut: float = 0.0
    """When the pace was last cut; 0: never, or climbed back to the limit since."""
    start: float = 0.0
    """The pace the last cut set, calls per second."""
    target: float = 0.0
    """What Plural accepted at the last cut, calls per second: where the climb levels off."""
    accepted: Mapping[int, int] = field(default_factory=dict)
    """Whole second -> calls Plural accepted in it (the last ``PEAK_SECONDS`` + 1)."""
    refused: Mapping[int, int] = field(default_factory=dict)
    """Whole second -> calls Plural throttled in it (with ``accepted``, what the fleet sent in it)."""
    since: float = 0.0
    """When answers began to be counted, after the pace was idle: the second it fell in is
    not a whole second of them (a drain rarely starts on a second's boundary)."""


def rate(state: Pace, limit: float, now: float) -> float:
    """Calls per second the limiter grants at ``now``: ``limit`` unless cut, else the climb."""
    if not state.cut:
        return limit
    growth = GROWTH * limit
    lag = ((state.target - state.start) / growth) ** (1 / 3) if state.target > state.start else 0.0
    t = now - state.cut - lag
    if t > 0:  # past the level: the hold, then the probe
        t, growth = max(0.0, t - HOLD), PROBE_GROWTH * limit
    return max(state.start, min(limit, state.target + growth * t * t * t))


def share(state: Pace, now: float) -> float:
    """The weighted share of calls throttled since the last cut, at ``now`` (0 without calls)."""
    calls = state.calls * _decay(state, now)
    return state.throttled * _decay(state, now) / calls if calls >= 1 else 0.0


def observe(state: Pace, limit: float, now: float, throttled: bool, sent_at: float) -> Pace:
    """The state after one call was answered at ``now``, ``throttled`` or not; ``sent_at``:
    when its slot was granted."""
    second = int(math.floor(now))
    if not state.at or now - state.at > PEAK_SECONDS + 1:
        state = replace(state, since=now)  # counting begins (again)
    # What Plural accepts and throttles each second, whatever the pace.
    accepted = {s: n for s, n in state.accepted.items() if s >= second - PEAK_SECONDS}
    refused = {s: n for s, n in state.refused.items() if s >= second - PEAK_SECONDS}
    counts = refused if throttled else accepted
    counts[second] = counts.get(second, 0) + 1
    if state.cut and sent_at < state.cut:
        # Granted at the old pace: no news of the new one.
        return replace(state, accepted=accepted, refused=refused, at=state.at or now)
    decay = _decay(state, now)
    calls, thrown = state.calls * decay + 1, state.throttled * decay + int(throttled)
    current = rate(state, limit, now)
    if state.cut and current >= limit:
        state = replace(state, cut=0.0)  # climbed back: nothing is held against the pace
    if calls >= MIN_CALLS and thrown > NOISE * calls + CONFIDENCE * math.sqrt(NOISE * (1 - NOISE) * calls):
        busiest = _accepts(accepted, refused, math.floor(state.since), second, current,
                           current * (1 - thrown / calls))
        target = max(FLOOR * limit, min(current, LEVEL * busiest))
        return Pace(0.0, 0.0, now, now, max(FLOOR * limit, min(target, BETA * busiest)), target, accepted,
                    refused, state.since)
    return replace(state, calls=calls, throttled=thrown, at=now, accepted=accepted, refused=refused)


def _accepts(accepted: Mapping[int, int], refused: Mapping[int, int], first: int, second: int,
             current: float, through: float) -> float:
    """What Plural accepts a second: the most it accepted in a whole recent second in which
    the fleet sent at least ``FULL`` of the ``current`` pace (not a second of a drain still
    gathering speed); without one, the most it accepted in any second, or ``through`` (the
    share of the pace that got through), whichever is more."""
    at_pace = [n for s, n in accepted.items() if first < s < second and n + refused.get(s, 0) >= FULL * current]
    return max(at_pace) if at_pace else max(max(accepted.values(), default=0), through)


def _decay(state: Pace, now: float) -> float:
    return math.exp(-max(0.0, now - state.at) / WINDOW) if state.at else 0.0


def from_fields(fields: Mapping[str, str]) -> Pace:
    """The state as the Redis hash stores it (``PACE_FN``)."""
    number = {k: float(v) for k, v in fields.items() if k[1:2] != ":"}
    return Pace(number.get("calls", 0.0), number.get("throttled", 0.0), number.get("at", 0.0),
                number.get("cut", 0.0), number.get("start", 0.0), number.get("target", 0.0),
                {int(k[2:]): int(float(v)) for k, v in fields.items() if k.startswith("a:")},
                {int(k[2:]): int(float(v)) for k, v in fields.items() if k.startswith("t:")}, number.get("since", 0.0))


# Functions for the limiter's scripts (``worker.ratelimit``): the rule above in Lua,
# on the time the caller passes (Redis's, in the product). The state is one hash.
PACE_FN = Lua(f"""
local PACE = {{window = {WINDOW!r}, min_calls = {MIN_CALLS!r}, noise = {NOISE!r}, confidence = {CONFIDENCE!r},
               beta = {BETA!r}, level = {LEVEL!r}, peak_seconds = {PEAK_SECONDS!r}, hold = {HOLD!r},
               growth = {GROWTH!r}, probe_growth = {PROBE_GROWTH!r}, floor = {FLOOR!r}, full = {FULL!r}}}

-- Calls per second granted at ``now``: ``limit`` unless the pace was cut, else the climb.
local function pace_rate(key, limit, now)
  local p = redis.call('HMGET', key, 'cut', 'start', 'target')
  local cut = tonumber(p[1] or '') or 0
  if cut == 0 then return limit end
  local start, target = tonumber(p[2]), tonumber(p[3])
  local growth = PACE.growth * limit
  local lag = 0
  if target > start then lag = ((target - start) / growth) ^ (1 / 3) end
  local t = now - cut - lag
  if t > 0 then  -- past the level: the hold, then the probe
    t, growth = math.max(0, t - PACE.hold), PACE.probe_growth * limit
  end
  return math.max(start, math.min(limit, target + growth * t * t * t))
end

-- One call answered at ``now``, throttled (1) or not (0), its slot granted at ``sent_at``.
-- Returns 1 when it cut the pace.
local function pace_observe(key, limit, now, throttled, sent_at)
  -- The hash in one read: its numbers, and what Plural accepted (a:) and throttled (t:)
  -- each recent second.
  local h, accepted, refused = {{}}, {{}}, {{}}
  local flat = redis.call('HGETALL', key)
  local second = math.floor(now)
  for i = 1, #flat, 2 do
    local field, kind = flat[i], string.sub(flat[i], 1, 2)
    if kind == 'a:' or kind == 't:' then
      local s = tonumber(string.sub(field, 3))
      if s < second - PACE.peak_seconds then
        redis.call('HDEL', key, field)
      elseif kind == 'a:' then
        accepted[s] = tonumber(flat[i + 1])
      else
        refused[s] = tonumber(flat[i + 1])
      end
    else
      h[field] = tonumber(flat[i + 1])
    end
  end
  local cut, at, since = h.cut or 0, h.at or 0, h.since or 0
  if at == 0 or now - at > PACE.peak_seconds + 1 then
    since = now  -- counting begins (again)
    redis.call('HSET', key, 'since', fmt(since))
  end
  -- What Plural accepts and throttles each second, whatever the pace.
  if throttled == 1 then
    refused[second] = redis.call('HINCRBY', key, 't:' .. second, 1)
  else
    accepted[second] = redis.call('HINCRBY', key, 'a:' .. second, 1)
  end
  if cut > 0 and sent_at < cut then
    -- Granted at the old pace: no news of the new one.
    if at == 0 then redis.call('HSET', key, 'at', fmt(now)) end
    return 0
  end
  local decay = 0
  if at > 0 then decay = math.exp(-math.max(0, now - at) / PACE.window) end
  local calls = (h.calls or 0) * decay + 1
  local thrown = (h.throttled or 0) * decay + throttled
  local current = pace_rate(key, limit, now)
  if cut > 0 and current >= limit then redis.call('HSET', key, 'cut', '0') end
  local noise = PACE.noise
  if calls >= PACE.min_calls and thrown > noise * calls + PACE.confidence * math.sqrt(noise * (1 - noise) * calls) then
    -- What Plural accepts a second (``_accepts`` in Python).
    local busiest, any = nil, current * (1 - thrown / calls)
    for s, n in pairs(accepted) do
      any = math.max(any, n)
      if s > math.floor(since) and s < second and n + (refused[s] or 0) >= PACE.full * current then
        busiest = math.max(busiest or 0, n)
      end
    end
    busiest = busiest or any
    local target = math.max(PACE.floor * limit, math.min(current, PACE.level * busiest))
    redis.call('HSET', key, 'calls', '0', 'throttled', '0', 'at', fmt(now), 'cut', fmt(now),
               'start', fmt(math.max(PACE.floor * limit, math.min(target, PACE.beta * busiest))), 'target', fmt(target))
    return 1
  end
  redis.call('HSET', key, 'calls', fmt(calls), 'throttled', fmt(thrown), 'at', fmt(now))
  return 0
end
""", needs=(REDIS_NOW,))
"""Lua: ``pace_rate(key, limit, now)`` and ``pace_observe(key, limit, now, throttled, sent_at)``."""
