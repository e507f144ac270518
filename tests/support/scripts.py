"""The product's Lua functions run one at a time, for the tests of each rule alone.

The worker runs the ledger's claim, the breaker's allow and record, and the limiter's
reserve and penalty only inside the two larger scripts of ``worker.attempts`` (one round
trip to admit a delivery, one to settle it). The tests of each rule call the same
function here, on its own, with the same KEYS and ARGV (the ``*_call`` methods), so
the product keeps no single-script wrapper that only tests would run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from worker.breaker import ALLOW_FN, RECORD_FN, Gate, RedisCircuitBreaker, parse_gate
from worker.ledger import Claim, Ledger, parse_claim
from worker.ledger_lua import CLAIM_FN
from worker.ratelimit import PENALIZE_FN, RESERVE_FN, RedisRateLimiter, Reservation, parse_reservation


def run(client, source: str, function: str, keys: list[str], args: list[Any]) -> Any:
    """Run the Lua ``function`` defined in ``source`` once, as a script of its own."""
    return client.register_script(f"{source}\nreturn {function}(KEYS, ARGV)\n")(keys=keys, args=args)


def claim(ledger: Ledger, request_id: str, payment_link_id: str, owner: str, lease: float) -> Claim:
    """The ledger's claim alone: take the cancel for one attempt under a lease of ``lease`` seconds."""
    return parse_claim(run(ledger.redis, CLAIM_FN, "claim", *ledger.claim_call(request_id, payment_link_id, owner,
                                                                                lease)))


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


def penalize(limiter: RedisRateLimiter, factor: float = 0.5, seconds: float = 60.0) -> None:
    """The limiter's 429 slow-down alone."""
    run(limiter.redis, PENALIZE_FN, "penalize", *limiter.penalize_call(factor, seconds))


def acquire(limiter: RedisRateLimiter, max_wait: float, sleep: Callable[[float], None] = time.sleep) -> Reservation:
    """Reserve a slot and, when granted, sleep until it (how a worker thread waits in line)."""
    reservation = reserve(limiter, max_wait)
    if reservation.granted and reservation.wait > 0:
        sleep(reservation.wait)
    return reservation
