"""Accounts and access tokens: Generate Token checks a pair, every payment-link call a token.

Each token belongs to the account (client id) that obtained it, so per-account faults and
limits (:mod:`sandbox.faults`) know whose call a request is.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import Callable, Iterable, Mapping

MAX_TOKENS = 100_000
"""Live tokens kept at most; beyond it expired ones are purged, then the oldest dropped."""
MAX_HISTORY = 10_000
"""Issued tokens remembered (revoked and expired ones included) for leak checks."""

Accounts = Mapping[str, str] | Iterable[tuple[str, str]]
"""Plural accounts: client id -> secret, or (client id, secret) pairs."""


def account_map(accounts: Accounts | None = None, *,
                client_id: str | None = None, client_secret: str | None = None) -> dict[str, str]:
    """Client id -> secret from ``accounts`` plus the ``client_id``/``client_secret`` pair.

    ``ValueError`` naming ``account`` for an empty client id or secret, or for one client id
    given two different secrets.
    """
    pairs = list(accounts.items() if isinstance(accounts, Mapping) else accounts or ())
    if client_id is not None or client_secret is not None:
        pairs.append((client_id or "", client_secret or ""))
    known: dict[str, str] = {}
    for account, secret in pairs:
        if not isinstance(account, str) or not account or not isinstance(secret, str) or not secret:
            raise ValueError("account: a client id and a secret, both non-empty, are needed")
        if known.get(account, secret) != secret:
            raise ValueError(f"account {account!r} is given two different secrets")
        known[account] = secret
    return known


class TokenStore:
    """Opaque bearer tokens with an expiry and an owner, and the accounts they are issued to."""

    def __init__(self, *, client_id: str | None = None, client_secret: str | None = None,
                 accounts: Accounts | None = None, clock: Callable[[], float] = time.time):
        """The accounts are ``accounts`` (client id -> secret, or pairs) plus the
        ``client_id``/``client_secret`` pair; with none at all, any credentials are accepted
        and a token belongs to the client id that asked for it.

        ``clock`` returns epoch seconds.
        """
        self._accounts = account_map(accounts, client_id=client_id, client_secret=client_secret)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, str]] = {}
        """Token -> (expiry in epoch seconds, its account's client id)."""
        self._history: deque[str] = deque(maxlen=MAX_HISTORY)

    @property
    def accounts(self) -> list[str]:
        """The configured client ids, sorted; empty when any credentials are accepted."""
        return sorted(self._accounts)

    def is_account(self, client_id: str) -> bool:
        """True for a configured client id, or for any when none is configured."""
        return not self._accounts or client_id in self._accounts

    def account_for(self, client_id: str, client_secret: str) -> str | None:
        """The account these credentials log in to (its client id), or None if refused."""
        if not self._accounts:
            return client_id
        expected = self._accounts.get(client_id)
        if expected is None or not secrets.compare_digest(client_secret, expected):
            return None
        return client_id

    def issue(self, ttl: float, account: str) -> tuple[str, float]:
        """A new token of ``account`` living ``ttl`` seconds; returns it and its expiry in
        epoch seconds."""
        token = secrets.token_urlsafe(48)
        with self._lock:
            expires_at = self._clock() + ttl
            if len(self._tokens) >= MAX_TOKENS:
                self._prune()
            self._tokens[token] = (expires_at, account)
            self._history.append(token)
        return token, expires_at

    def owner(self, token: str) -> str | None:
        """The account ``token`` belongs to when this sandbox issued it, it is not revoked
        and has not expired; else None."""
        held = self._tokens.get(token)
        if held is None or self._clock() >= held[0]:
            return None
        return held[1]

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
        self._tokens = {t: held for t, held in self._tokens.items() if held[0] > now}
        while len(self._tokens) >= MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]
