"""Measuring a stream of event times (rate-limit checks in tests and benchmarks)."""

from __future__ import annotations


def largest_window(times: list[float], width: float = 1.0) -> int:
    """The most timestamps in any half-open window ``[t, t + width)`` (seconds) starting at one of them."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + width:
            j += 1
        best = max(best, j - i)
    return best
