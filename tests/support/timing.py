"""Measuring a stream of event times (rate-limit checks in tests and benchmarks)."""

from __future__ import annotations


def busiest_window(times: list[float], width: float = 1.0) -> tuple[int, float | None]:
    """The most timestamps in any half-open window ``[t, t + width)`` (seconds) starting at
    one of them, and that ``t`` (None when there are no timestamps)."""
    times = sorted(times)
    best, start, j = 0, None, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + width:
            j += 1
        if j - i > best:
            best, start = j - i, t
    return best, start


def largest_window(times: list[float], width: float = 1.0) -> int:
    """The most timestamps in any half-open window ``[t, t + width)`` (seconds) starting at one of them."""
    return busiest_window(times, width)[0]
