"""One error hierarchy for everything that can go wrong talking to Plural.

Every error carries what an on-call engineer needs (HTTP status, Plural's code and
message, its details, the Request-ID) and whether trying again can help. One
function, :func:`classify_http`, turns an HTTP answer into an error; nothing else
decides retryability.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, Mapping


class PluralError(Exception):
    """Base of every error raised by the Plural client."""

    retryable = False

    def __init__(self, message: str, *, http_status: int | None = None, code: str | None = None,
                 details: Mapping[str, Any] | None = None, request_id: str | None = None,
                 retry_after: float | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.details = dict(details or {})
        self.request_id = request_id
        self.retry_after = retry_after
        """Seconds Plural asked us to wait (from ``Retry-After``), or None."""
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        bits = [self.message]
        if self.http_status is not None:
            bits.append(f"http_status={self.http_status}")
        if self.code:
            bits.append(f"code={self.code}")
        if self.request_id:
            bits.append(f"request_id={self.request_id}")
        return " ".join(bits)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def as_dict(self) -> dict[str, Any]:
        """What a status record keeps of this error (no secrets, no personal data)."""
        return {"http_status": self.http_status, "code": self.code or type(self).__name__,
                "message": self.message[:300]}


class PluralConnectionError(PluralError):
    """Plural could not be reached, or the connection broke mid-answer."""

    retryable = True


class PluralTimeout(PluralConnectionError):
    """Plural did not answer within the read timeout."""


class PluralTLSError(PluralError):
    """TLS failed (bad certificate, wrong host): a configuration problem, never retried."""


class PluralServerError(PluralError):
    """Plural answered 5xx."""

    retryable = True


class PluralRateLimited(PluralError):
    """Plural answered 429; ``retry_after`` holds its hint when it gave one."""

    retryable = True


class PluralAuthError(PluralError):
    """The bearer token was rejected (401), or the credentials were refused by Generate Token."""


class PluralRequestError(PluralError):
    """Any other 4xx: Plural understood the request and refused it."""


class PluralBadResponse(PluralError):
    """Plural's answer could not be read: not JSON, truncated, empty, or the wrong shape."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def classify_http(status: int, body: Any, *, request_id: str | None = None,
                  retry_after: str | None = None, text_snippet: str = "") -> PluralError:
    """The one decision: which error an HTTP answer other than 2xx is, and whether it is retryable.

    5xx and 429 are retryable; 401 means the token was rejected; every other 4xx is final.
    ``body`` is the parsed JSON (or None when the answer was not JSON).
    """
    code = message = None
    details: Mapping[str, Any] = {}
    if isinstance(body, Mapping):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        message = body.get("message") if isinstance(body.get("message"), str) else None
        raw_details = body.get("additionalErrorPayload") or body.get("additional_error_details")
        if isinstance(raw_details, Mapping):
            details = raw_details
    if message is None:
        message = f"Plural answered HTTP {status}" + (" with a body that is not JSON" if body is None and text_snippet else "")
    kwargs = dict(http_status=status, code=code, details=details, request_id=request_id)
    if status == 429:
        return PluralRateLimited(message, retry_after=parse_retry_after(retry_after), **kwargs)
    if status >= 500:
        return PluralServerError(message, retry_after=parse_retry_after(retry_after), **kwargs)
    if status == 401:
        return PluralAuthError(message, **kwargs)
    return PluralRequestError(message, **kwargs)
