"""The product's Lua functions run one at a time, for the tests of each rule alone.

The worker runs the ledger's claim, the breaker's allow and record, and the limiter's
reserve and pace only inside the two larger scripts of ``worker.attempts`` (one round
trip to admit a delivery, one to settle it). The tests of each rule call the same
function here, on its own, with the same KEYS and ARGV (the ``*_call`` methods), so
the product keeps no single-script wrapper that only tests would run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from plural_cancel.worker.breaker import ALLOW_FN, RECORD_FN, Gate, RedisCircuitBreaker, parse_gate
from plural_cancel.worker.ledger import Claim, Ledger, parse_claim
from plural_cancel.worker.ledger_lua import CLAIM_FN
from plural_cancel.worker.lua import script
from plural_cancel.worker.pace import PACE_FN
from plural_cancel.worker.ratelimit import OBSERVE_FN, RESERVE_FN, RedisRateLimiter, Reservation, parse_reservation


def run(client, source: str, function: str, keys: list[str], args: list[Any]) -> Any:
    """Run the Lua ``function`` defined in ``source`` once, as a script of its own."""
    return client.register_script(script(source, f"return {function}(KEYS, ARGV)"))(keys=keys, args=args)


def claim(ledger: Ledger, request_id: str, payment_link_id: str, owner: str, lease: float,
          budget: float = 600.0, account: str = "default") -> Claim:
    """The ledger's claim alone: take the cancel of ``account`` for one attempt under a lease of
    ``lease`` seconds (its retry budget, ``budget`` seconds from its first attempt, the policy's)."""
    return parse_claim(run(ledger.redis, CLAIM_FN, "claim", *ledger.claim_call(request_id, payment_link_id, owner,
                                                                                lease, budget, account)))


def allow(breaker: RedisCircuitBreaker, owner: str) -> Gate:
    """The breaker's gate alone (``owner`` takes the probe lock when half open)."""
    return parse_gate(run(breaker.redis, ALLOW_FN, "allow", *breaker.allow_call(owner)))


def record(breaker: RedisCircuitBreaker, outcome: str, payment_link_id: str, *, probe: bool = False,
           owner: str = "") -> bool:
    """The breaker's record alone; True when this outcome opened a closed breaker."""
    keys, args = breaker.record_call(outcome, payment_link_id, probe=probe, owner=owner)
    return bool(int(run(breaker.redis, RECORD_FN, "record", keys, args)))


def reserve(limiter: RedisRateLimiter, max_wait: float) -> Reservation:
    """The limiter's reservation alone: the next free slot if at most ``max_wait`` seconds away."""
    return parse_reservation(run(limiter.redis, RESERVE_FN, "reserve", *limiter.reserve_call(max_wait)))


def observe(limiter: RedisRateLimiter, throttled: bool, sent_at: float = 0.0) -> bool:
    """The pace's observation of one answered call alone (now by Redis's clock); True if it cut."""
    return bool(int(run(limiter.redis, OBSERVE_FN, "observe", *limiter.observe_call(throttled, sent_at))))


PACE_AT = script(PACE_FN, """
if ARGV[1] == 'observe' then
  return pace_observe(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
end
return fmt(pace_rate(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])))
""")
"""The pace's two Lua functions on a time the caller gives (``tests/test_pace.py``): ``observe``
LIMIT NOW THROTTLED SENT_AT, or ``rate`` LIMIT NOW."""


def pace_at(client, key: str, what: str, limit: float, now: float, *args: Any) -> Any:
    """Run ``pace_observe`` or ``pace_rate`` (``what``) at ``now`` on the pace hash ``key``."""
    return client.register_script(PACE_AT)(keys=[key], args=[what, repr(limit), repr(now), *map(repr, args)])


def acquire(limiter: RedisRateLimiter, max_wait: float, sleep: Callable[[float], None] = time.sleep) -> Reservation:
    """Reserve a slot and, when granted, sleep until it (how a worker thread waits in line)."""
    reservation = reserve(limiter, max_wait)
    if reservation.granted and reservation.wait > 0:
        sleep(reservation.wait)
    return reservation
