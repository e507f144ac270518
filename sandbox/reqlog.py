"""The in-memory log of every /api request, bounded, for tests and benchmarks to inspect."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

MAX_ENTRIES = 200_000
"""Entries kept; the oldest are dropped first."""


class Entry:
    """One request as the sandbox saw it. ``status`` is None for a reset (no answer)."""

    __slots__ = ("seq", "method", "path", "link_id", "request_id", "account", "timestamp", "sent_at",
                 "status", "fault")

    def __init__(self, seq: int, method: str, path: str, link_id: str | None,
                 request_id: str | None, account: str | None, timestamp: float):
        self.seq = seq
        self.method = method
        self.path = path
        self.link_id = link_id
        self.request_id = request_id
        self.account = account
        """The client id whose call this is: its bearer token's account, or for Generate Token
        the account its body names (accepted or not); None when neither is an account."""
        self.timestamp = timestamp
        """Epoch seconds at arrival."""
        self.sent_at: float | None = None
        """Epoch seconds of the sending, as the caller's ``Request-Timestamp`` says; None without one."""
        self.status: int | None = None
        self.fault: str | None = None
        """What a fault made of it (:attr:`sandbox.faults.Decision.label`): ``503``, ``reset``,
        ``limit``, ``throttle``, ``plural_throttle``...; None when none did."""

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "method": self.method, "path": self.path,
                "link_id": self.link_id, "request_id": self.request_id, "account": self.account,
                "timestamp": self.timestamp, "sent_at": self.sent_at, "status": self.status, "fault": self.fault}


class RequestLog:
    """Append-only (bounded) request log with monotonically increasing ``seq`` numbers."""

    def __init__(self, *, maxlen: int = MAX_ENTRIES, clock: Callable[[], float] = time.time):
        self._entries: deque[Entry] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._seq = 0
        self._clock = clock

    def record(self, method: str, path: str, link_id: str | None,
               request_id: str | None, account: str | None = None) -> Entry:
        """Log a request on arrival; the caller fills ``status`` and ``fault`` on the entry."""
        with self._lock:
            self._seq += 1
            entry = Entry(self._seq, method, path, link_id, request_id, account, self._clock())
            self._entries.append(entry)
        return entry

    def since(self, seq: int = 0) -> list[dict[str, Any]]:
        """Entries with a ``seq`` above ``seq``, oldest first."""
        with self._lock:
            entries = list(self._entries)
        if entries and seq >= entries[0].seq:
            # seq numbers are dense within the deque, so skip straight to the first wanted one.
            entries = entries[seq - entries[0].seq + 1:]
        return [e.to_dict() for e in entries if e.seq > seq]

    def clear(self) -> None:
        """Drop every entry; ``seq`` keeps counting so ``since`` stays meaningful."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
