"""One error hierarchy for everything that can go wrong talking to Plural.

Every error carries what an on-call engineer needs (HTTP status, Plural's code and
message, its details, the Request-ID) and whether trying again can help. One
function, :func:`classify_http`, turns an HTTP answer into an error; nothing else
decides retryability of an HTTP answer.

Messages never hold a response body, a token or a secret: bodies can carry customer
personal data, and messages end up in logs, Sentry and the status record.
"""

from __future__ import annotations

import email.utils
import re
import time
from datetime import timezone
from typing import Any, Mapping

MAX_MESSAGE = 300
"""Characters of Plural's own error message kept (a bound on what reaches logs and Redis)."""

# Codes Plural uses for refused credentials; documented with HTTP 422, not 401.
AUTH_CODES = frozenset({"USER_AUTHENTICATION_FAILED", "INVALID_USER_ACCOUNT", "UNAUTHORIZED"})
# Those of them that say the bearer token was not accepted, which a fresh token can mend.
# INVALID_USER_ACCOUNT is left out: it names the merchant's account (disabled, unknown),
# and no new token for the same account changes that.
TOKEN_CODES = frozenset({"USER_AUTHENTICATION_FAILED", "UNAUTHORIZED"})


class PluralError(Exception):
    """Base of every error raised by the Plural client."""

    retryable = False

    def __init__(self, message: str, *, http_status: int | None = None, code: str | None = None,
                 details: Mapping[str, Any] | None = None, request_id: str | None = None,
                 retry_after: float | None = None, retryable: bool | None = None, sent: bool = True):
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
        self.sent = sent
        """False when the call certainly never left this host (refused, unresolvable, connect
        timeout, TLS handshake, proxy, the deadline passed first, or the token step failed
        before the call was made), so Plural cannot have acted on it; True whenever it may
        have (a read timeout, a reset mid-answer, any HTTP answer)."""

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

    def __reduce__(self):
        # Celery and billiard pickle exceptions between processes; the default
        # reduction would call cls(message) and lose every keyword attribute.
        return (_rebuild, (type(self), self.message, self._state()))

    def _state(self) -> dict[str, Any]:
        return dict(http_status=self.http_status, code=self.code, details=self.details,
                    request_id=self.request_id, retry_after=self.retry_after, retryable=self.retryable,
                    sent=self.sent)

    def as_dict(self) -> dict[str, Any]:
        """What a status record keeps of this error (no secrets, no personal data)."""
        return {"http_status": self.http_status, "code": self.code or type(self).__name__,
                "message": self.message[:MAX_MESSAGE]}


def _rebuild(cls: type[PluralError], message: str, state: dict[str, Any]) -> PluralError:
    return cls(message, **state)


class PluralConnectionError(PluralError):
    """Plural could not be reached, or the connection broke mid-answer."""

    retryable = True


class PluralTimeout(PluralConnectionError):
    """Plural did not connect or answer within the timeout (the request may have been processed)."""


class PluralTLSError(PluralError):
    """TLS failed (bad certificate, wrong host): a configuration problem, never retried."""


class PluralServerError(PluralError):
    """Plural answered 5xx."""

    retryable = True


class PluralRateLimited(PluralError):
    """Plural answered 429; ``retry_after`` holds its hint when it gave one."""

    retryable = True


class PluralAuthError(PluralError):
    """A token rejected twice (401 or an auth code), the account refused, or Generate Token refusing the credentials."""


class PluralRequestError(PluralError):
    """A 4xx with Plural's error body: Plural understood the request and refused it."""


class PluralUnexpectedAnswer(PluralError):
    """A 4xx without Plural's error body (a WAF's page, a proxy's 407, a wrong path's 404): retried."""

    retryable = True


class PluralBadResponse(PluralError):
    """Plural's answer could not be read: not JSON, truncated, empty, a redirect, or the wrong shape."""


_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from ``now`` (epoch seconds; default the wall clock).

    Accepts delta-seconds (``7``) or an HTTP date; a date in the past gives 0.
    None when absent, negative or unreadable: a garbled hint must not stall a retry.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000" yields a naive datetime; HTTP dates are always UTC
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def classify_http(status: int, body: Any, *, request_id: str | None = None,
                  retry_after: str | None = None, body_note: str = "",
                  now: float | None = None) -> PluralError:
    """The one decision: which error an HTTP answer other than 2xx is, and whether it is retryable.

    ``status`` is the HTTP status; ``body`` the parsed JSON (None when the answer was not
    JSON); ``retry_after`` the raw ``Retry-After`` header; ``now`` the clock (epoch seconds)
    against which an HTTP-date hint is measured. ``body_note`` describes an unreadable body
    (e.g. ``"body is not JSON (text/html, 1234 bytes)"``) and is appended to the message:
    the body itself never is.

    5xx, 429 and 408 (a :class:`PluralTimeout`) are retryable, keeping any ``Retry-After``
    hint; 401, and a 4xx whose code says the credentials were refused, are
    :class:`PluralAuthError`; a 3xx is a :class:`PluralBadResponse` (redirects are not
    followed). Any other 4xx is final (:class:`PluralRequestError`) only when its body is
    Plural's error object (a string ``code`` or ``message``); without one it came from
    something between us and Plural, or from a path Plural does not serve, and says
    nothing about the link: a retryable :class:`PluralUnexpectedAnswer`.
    """
    code = message = None
    details: Mapping[str, Any] = {}
    plurals = False
    if isinstance(body, Mapping):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        message = body.get("message") if isinstance(body.get("message"), str) else None
        plurals = code is not None or message is not None
        # Plural names its details object both ways in different responses.
        for name in ("additionalErrorPayload", "additional_error_details"):
            if isinstance(body.get(name), Mapping):
                details = body[name]
                break
    if message:
        message = message[:MAX_MESSAGE]
    else:
        message = f"Plural answered HTTP {status}"
        if body_note:
            message += f"; {body_note}"
    kwargs = dict(http_status=status, code=code, details=details, request_id=request_id)
    if 300 <= status < 400:
        return PluralBadResponse(
            f"Plural answered a redirect (HTTP {status}), which is not followed: check PLURAL_BASE_URL",
            **kwargs)
    if status == 429:
        return PluralRateLimited(message, retry_after=parse_retry_after(retry_after, now), **kwargs)
    if status >= 500:
        return PluralServerError(message, retry_after=parse_retry_after(retry_after, now), **kwargs)
    if status == 408:
        # The server (or a proxy) gave up waiting for our request: a timeout, not a refusal,
        # so it must not be read as "Plural refused this cancel".
        return PluralTimeout(message, retry_after=parse_retry_after(retry_after, now), **kwargs)
    if status == 401 or code in AUTH_CODES:
        return PluralAuthError(message, **kwargs)
    if 400 <= status < 500:
        if plurals:
            return PluralRequestError(message, **kwargs)
        # Only Plural's own error object is Plural's word on the link. Anything else (an
        # HTML page from a firewall, a proxy's 407, a load balancer's 404, a gateway's own
        # JSON) means the request may never have reached Plural's API: try again later.
        shape = body_note or f"the body is not Plural's error shape ({_json_kind(body)})"
        return PluralUnexpectedAnswer(f"HTTP {status} that is not Plural's error answer; {shape}",
                                      retry_after=parse_retry_after(retry_after, now), **kwargs)
    # 1xx or 2xx handed here by mistake, or a status outside HTTP's range.
    return PluralBadResponse(message, **kwargs)


def _json_kind(body: Any) -> str:
    """What kind of JSON value ``body`` is (``JSON object``, ``JSON list``...), never its content."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return "JSON " + kinds.get(type(body), "number")
