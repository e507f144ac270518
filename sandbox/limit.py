"""Plural's own limit on cancels, counted per account (the ``limit_rps`` fault).

A sliding window over the cancels each account had admitted: at most ``n = max(1, ⌊R⌋)``
in any ``n / R`` seconds, so for a whole ``R``, at most ``R`` in any one second. A sliding
window rather than a token bucket: a full bucket lets a second's worth through on top of
the rate, so a client at 1.5 R would see far fewer than a third of its cancels refused over
a few seconds, and a test could not tell a limit tracked from one overrun.
"""

from __future__ import annotations

from collections import deque


class AccountLimit:
    """The admitted cancels of each account, newest ``n`` only. Not thread-safe: the caller
    (:class:`sandbox.faults.FaultInjector`) holds its lock."""

    def __init__(self) -> None:
        self._windows: dict[str, deque[float]] = {}

    def admit(self, account: str, rate: float, now: float) -> float:
        """Admit one cancel of ``account`` arriving at ``now`` (seconds) under ``rate`` (cancels
        a second, > 0) and return 0, or refuse it and return the seconds (> 0) until the
        account's next free slot."""
        size = max(1, int(rate))
        span = size / rate
        window = self._windows.get(account)
        if window is None or window.maxlen != size:  # new account, or its limit changed
            window = self._windows[account] = deque(window or (), maxlen=size)
        if len(window) == size:
            wait = window[0] + span - now
            if wait > 0:
                # At most one window: a wall clock set back must not ask for an hour's wait.
                return min(wait, span)
        window.append(now)  # drops the oldest once full
        return 0.0

    def clear(self, account: str | None = None) -> None:
        """Forget what ``account`` (every account with None) was admitted."""
        if account is None:
            self._windows.clear()
        else:
            self._windows.pop(account, None)
