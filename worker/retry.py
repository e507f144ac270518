"""Retry delays: exponential backoff with full jitter, never earlier than Plural asks.

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
