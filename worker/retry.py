"""Retry delays: exponential backoff with full jitter for failures, never earlier than
Plural asks; Plural's own Retry-After for a throttle.

Full jitter (a delay drawn uniformly from zero to the exponential ceiling) spreads
the retries of thousands of cancels that failed together, so a recovering Plural
is not hit by them all at once (see AWS's "Exponential Backoff And Jitter").
"""

from __future__ import annotations

from typing import Callable


def backoff(attempt: int, *, base: float, cap: float, jitter: Callable[[], float],
            retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1``, after ``attempt`` (>= 1) failed ones.

    ``jitter`` returns a float in [0, 1); ``retry_after`` (seconds) is Plural's own
    hint from a 429 or 503, and the delay is never shorter than it.
    """
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = ceiling * jitter()
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


THROTTLE_WAIT = 1.0
"""Seconds a throttled cancel waits when Plural's answer names no ``Retry-After``."""

THROTTLE_SPREAD = 0.5
"""Seconds, at most, added to a throttle's wait, so the cancels one burst of 429s answered
do not all come back in the same instant."""


def throttle_wait(retry_after: float | None, *, jitter: Callable[[], float]) -> float:
    """Seconds a cancel Plural throttled waits: its ``Retry-After`` (``THROTTLE_WAIT`` without
    one), plus up to ``THROTTLE_SPREAD``. Not a failure, so it never grows with the attempts:
    the fleet's pace (``worker.pace``) is what answers a Plural that throttles more."""
    return (THROTTLE_WAIT if retry_after is None else retry_after) + THROTTLE_SPREAD * jitter()
