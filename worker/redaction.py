"""Masking of secrets and personal data by their shape, before text leaves the process.

One :class:`Redactor` serves every way out: log lines (``worker.logs``), Sentry events
(``worker.reporting``) and the errors a status record keeps in Redis (``worker.ledger``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from plural_cancel.config.settings import Settings

MASK = "[Filtered]"

_PATTERNS = (
    # Authorization headers and anything else shaped like a bearer token.
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1" + MASK),
    # "access_token": "...", client_secret=..., token: ... in any text (JSON, URLs, reprs).
    (re.compile(r"(?i)(\b(?:access_token|refresh_token|client_secret|token|authorization)\b[\"']?\s*[:=]\s*[\"']?)"
                r"[^\"'\s,&}]{4,}"), r"\1" + MASK),
    # user:password@host in URLs (REDIS_URL, proxies).
    (re.compile(r"(://[^/\s:@]*:)[^@\s/]+@"), r"\1" + MASK + "@"),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "[email]"),
    # Indian mobile numbers (10 digits from 6-9, maybe +91), and any +country number.
    (re.compile(r"(?<![\w.])(?:\+?91[\s-]?)?[6-9]\d{9}(?![\w.])"), "[phone]"),
    (re.compile(r"(?<![\w.])\+\d{1,3}[\s-]?\d[\d\s-]{6,13}\d(?![\w.])"), "[phone]"),
)


class Redactor:
    """Masks secrets and personal data by their shape (and the given literal secrets) in text."""

    def __init__(self, secrets: Iterable[str] = ()):
        # Longest first, so that a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def learn(self, secrets: Iterable[str]) -> None:
        """Know ``secrets`` by value too (an account added to the accounts file at run time).
        The list is replaced whole, so a thread masking meanwhile uses the old one or the new."""
        self.secrets = sorted(set(self.secrets) | {s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def text(self, value: str) -> str:
        """``value`` with every secret, bearer token, URL password, e-mail and phone masked."""
        for secret in self.secrets:
            value = value.replace(secret, MASK)
        for pattern, replacement in _PATTERNS:
            value = pattern.sub(replacement, value)
        return value

    def walk(self, value: Any) -> Any:
        """A copy of ``value`` (JSON-like) with :meth:`text` applied to every string in it."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.walk(v) for v in value]
        return value


def redactor_for(settings: Settings, secrets: Iterable[str] = ()) -> Redactor:
    """A redactor that knows the client secret by value, and ``secrets`` (the accounts'
    secrets: ``Runtime.redactor``, the one every way out of a worker shares)."""
    return Redactor([*([settings.client_secret.reveal()] if settings.client_secret else []), *secrets])
