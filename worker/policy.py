"""The retry policy: the one home of "try again or not", "when", and "until when".

Modelled on botocore's ``RetryPolicy`` (a checker and a backoff): what an attempt came to
(``worker.decide``: Plural's answer, or the error of asking) goes in, and out comes
either an ending or a delay. Nothing else decides a retry:

- **Retry or not** (:meth:`RetryPolicy.settle`): an answer that settles nothing yet (a
  payment in flight, a success whose link is still open, an answer that cannot be read)
  is tried again; an error is tried again when it is of a kind that can mend
  (:func:`retryable`), else the cancel ends ``failed`` / ``rejected``.
- **When** (:meth:`RetryPolicy.delay`): a failure backs off exponentially with full jitter
  (never earlier than Plural's ``Retry-After``), counting failed attempts alone; a throttle
  waits its own ``Retry-After`` and grows no backoff (the fleet's pace, ``worker.pace``,
  answers a Plural that throttles more); the holds before any call (an open breaker, a
  rate-limit slot too far ahead, a slot missed) have their own short delays here too.
- **Until when** (:attr:`RetryPolicy.budget`): seconds from the first attempt. A retry
  whose delay would end past the budget ends the cancel ``gave_up`` instead
  (:meth:`RetryPolicy.settle`); at admission, a cancel whose budget is spent ends there
  in the same round trip: ``worker.attempts`` hands the budget to its script in ARGV,
  which applies it and decides nothing of its own.

Full jitter (a delay drawn uniformly from zero to the exponential ceiling) spreads the
retries of thousands of cancels that failed together, so a recovering Plural is not hit
by them all at once (AWS's "Exponential Backoff And Jitter").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from plural_cancel.errors import PluralError, PluralRateLimited

TOKEN_REFRESHES = 1
"""Within one attempt, how many times a bearer token Plural refused is dropped and the call
sent again with a fresh one (``worker.plural``): an expired or rotated token is mended
this way; a second refusal is a real authentication failure."""

THROTTLE_WAIT = 1.0
"""Seconds a throttled cancel waits when Plural's answer names no ``Retry-After``."""

THROTTLE_SPREAD = 0.5
"""Seconds, at most, added to a throttle's wait, so the cancels one burst of 429s answered
do not all come back in the same instant."""

HOLD_SPREAD = 2.0
"""Seconds over which cancels held back together by the breaker are spread on return."""


def retryable(error: BaseException | None) -> bool:
    """Whether trying again can help after ``error``: an error of talking to Plural of a kind
    that can mend (each kind's ``retryable``, in ``plural_cancel.errors``: no answer, a 5xx, a
    throttle, an answer that is not Plural's, no token to be had). Not a refusal in Plural's
    words, refused credentials, a TLS failure, an answer that cannot be read (a redirect; an
    unreadable success is decided from the link, ``worker.decide``), or a request that
    could not be built. This module is the only reader of that mark."""
    return isinstance(error, PluralError) and error.retryable


def unsettled(state: str, error: BaseException | None) -> bool:
    """Whether an attempt that came to ``state`` (``worker.decide``'s) with ``error`` is tried
    again, budget allowing: nothing is known yet, or the error is one that can mend."""
    return state == "unsettled" or (state == "error" and retryable(error))


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


def throttle_wait(retry_after: float | None, *, jitter: Callable[[], float]) -> float:
    """Seconds a cancel Plural throttled waits: its ``Retry-After`` (``THROTTLE_WAIT`` without
    one), plus up to ``THROTTLE_SPREAD``. Not a failure, so it never grows with the attempts."""
    return (THROTTLE_WAIT if retry_after is None else retry_after) + THROTTLE_SPREAD * jitter()


@dataclass(frozen=True)
class Next:
    """What the policy made of one attempt: an ending, or a retry after ``delay`` seconds."""

    state: str
    """``succeeded``, ``failed`` or ``retry``."""
    outcome: str | None = None
    """For an ending: ``cancelled``, ``rejected``, ``gave_up``..."""
    delay: float = 0.0
    """For ``retry``: seconds until it is tried again."""
    throttled: bool = False
    """For ``retry``: Plural throttled the attempt (it waits its Retry-After, not a backoff)."""


@dataclass(frozen=True)
class RetryPolicy:
    """The retry rules with their settings (``RETRY_BASE``, ``RETRY_CAP``, ``RETRY_BUDGET``)
    and the process's one source of randomness (``jitter``: a float in [0, 1))."""

    base: float
    cap: float
    budget: float
    """Seconds from a cancel's first attempt after which it is not tried again."""
    jitter: Callable[[], float]

    def settle(self, state: str, outcome: str | None, error: BaseException | None, *, attempts: int,
               throttles: int, budget_left: float) -> Next:
        """What becomes of an attempt that came to ``state`` (``succeeded``, ``failed``,
        ``unsettled``: nothing is known yet, or ``error``: asking failed with ``error``):
        ``attempts`` made so far, this one included, ``throttles`` of them throttled before
        this one, ``budget_left`` seconds of the budget."""
        if not unsettled(state, error):
            return Next(state, outcome) if state in ("succeeded", "failed") else Next("failed", "rejected")
        throttled = isinstance(error, PluralRateLimited)
        retry_after = getattr(error, "retry_after", None)
        delay = self.delay(attempts - throttles, retry_after=retry_after, throttled=throttled)
        if delay > budget_left:
            return Next("failed", "gave_up")
        return Next("retry", delay=delay, throttled=throttled)

    def delay(self, failed: int, *, retry_after: float | None = None, throttled: bool = False) -> float:
        """Seconds before the next attempt, after ``failed`` failed attempts (throttles not
        among them): Plural's ``Retry-After`` for a throttle, else the backoff."""
        if throttled:
            return throttle_wait(retry_after, jitter=self.jitter)
        return backoff(failed, base=self.base, cap=self.cap, jitter=self.jitter, retry_after=retry_after)

    def breaker_hold(self, reopens_in: float) -> float:
        """Seconds a cancel waits while the breaker is open: until it reopens, spread over
        ``HOLD_SPREAD`` so held cancels do not all come back in one instant."""
        return reopens_in + HOLD_SPREAD * self.jitter()

    def slot_hold(self, wait: float, max_wait: float) -> float:
        """Seconds a cancel waits when the free rate-limit slot is ``wait`` s away, more than
        it may sleep (``max_wait``): back while that slot is still up to ``max_wait`` ahead,
        so a slot is reserved ahead of its time, none goes unused, and the drain stays at
        the limit. A slot missed (the call would have left too late) is ``wait`` 0."""
        return max(0.0, wait - max_wait) + max_wait * self.jitter()
