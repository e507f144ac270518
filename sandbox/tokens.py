"""Access tokens: issued by Generate Token, checked on every payment-link call."""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import Callable

MAX_TOKENS = 100_000
"""Live tokens kept at most; beyond it expired ones are purged, then the oldest dropped."""
MAX_HISTORY = 10_000
"""Issued tokens remembered (revoked and expired ones included) for leak checks."""


class TokenStore:
    """Opaque bearer tokens with an expiry, and the client credentials they are issued for."""

    def __init__(self, *, client_id: str | None = None, client_secret: str | None = None,
                 clock: Callable[[], float] = time.time):
        """With no ``client_id``/``client_secret`` configured, any credentials are accepted.

        ``clock`` returns epoch seconds.
        """
        self._client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._history: deque[str] = deque(maxlen=MAX_HISTORY)

    def credentials_ok(self, client_id: str, client_secret: str) -> bool:
        """True when the pair matches the configured one (any pair when none is configured)."""
        if self._client_id is None and self._client_secret is None:
            return True
        return (secrets.compare_digest(client_id, self._client_id or "")
                and secrets.compare_digest(client_secret, self._client_secret or ""))

    def issue(self, ttl: float) -> tuple[str, float]:
        """A new token living ``ttl`` seconds; returns it and its expiry in epoch seconds."""
        token = secrets.token_urlsafe(48)
        with self._lock:
            expires_at = self._clock() + ttl
            if len(self._tokens) >= MAX_TOKENS:
                self._prune()
            self._tokens[token] = expires_at
            self._history.append(token)
        return token, expires_at

    def valid(self, token: str) -> bool:
        """True when this sandbox issued ``token``, it is not revoked and has not expired."""
        expires_at = self._tokens.get(token)
        return expires_at is not None and self._clock() < expires_at

    def issued(self) -> list[str]:
        """Every token issued (the last ``MAX_HISTORY``), valid or not, oldest first."""
        with self._lock:
            return list(self._history)

    def revoke_all(self) -> int:
        """Invalidate every token issued so far; returns how many there were."""
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
            return count

    def __len__(self) -> int:
        return len(self._tokens)

    def _prune(self) -> None:
        now = self._clock()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        while len(self._tokens) >= MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]
