"""Which error a failed call to Plural is, and whether it may have left this host.

:func:`classify_http` decides for an HTTP answer other than 2xx, :func:`classify_transport`
for a failure below HTTP (no answer, or a broken one). Whether it is tried again, and
when, is the retry policy's (``worker.policy``), from the kind of error named here. The
errors themselves are in :mod:`plural_cancel.errors`.
"""

from __future__ import annotations

import email.utils
import re
import ssl
import time
from datetime import timezone
from typing import Any, Mapping

import requests
import urllib3
from urllib3.exceptions import NewConnectionError, ReadTimeoutError

from plural_cancel.errors import (
    MAX_MESSAGE,
    PluralAuthError,
    PluralBadResponse,
    PluralConnectionError,
    PluralError,
    PluralRateLimited,
    PluralRequestError,
    PluralServerError,
    PluralTimeout,
    PluralTLSError,
    PluralUnexpectedAnswer,
)

# Codes Plural uses for refused credentials; documented with HTTP 422, not 401.
AUTH_CODES = frozenset({"USER_AUTHENTICATION_FAILED", "INVALID_USER_ACCOUNT", "UNAUTHORIZED"})
# Those of them that say the bearer token was not accepted, which a fresh token can mend.
# INVALID_USER_ACCOUNT is left out: it names the merchant's account (disabled, unknown),
# and no new token for the same account changes that.
TOKEN_CODES = frozenset({"USER_AUTHENTICATION_FAILED", "UNAUTHORIZED"})


RATE_LIMIT_CODE = "RATE_LIMIT"
"""Any of Plural's error codes containing this names a throttle: ``PAYMENT_RATE_LIMIT`` and
``RATE_LIMITED`` appear in Plural's tooling (API-NOTES)."""


def throttle_code(code: str | None) -> bool:
    """Whether Plural's error ``code`` says "slower" (a rate limit) rather than "no"."""
    return code is not None and RATE_LIMIT_CODE in code.upper()


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
    hint, and so is a 4xx whose code names a rate limit (:func:`throttle_code`): a
    :class:`PluralRateLimited`, like a 429; 401, and a 4xx whose code says the credentials were refused, are
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
    if status == 429 or (400 <= status < 500 and throttle_code(code)):
        # "Slower", in HTTP's words or in Plural's (a 400 PAYMENT_RATE_LIMIT): never a refusal.
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


_NOT_SENT = (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader,
             requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
             requests.exceptions.InvalidProxyURL, urllib3.exceptions.LocationValueError)


def classify_transport(exc: BaseException, method: str, path: str, request_id: str, *,
                     answered: bool) -> PluralError:
    """The one decision for a failure below HTTP (no answer, or a broken one): which
    :class:`PluralError` it is, whether it may have been sent, whether it is retryable.

    ``answered``: the failure came while reading an answer's body, so the request was
    sent. Before that, ``sent`` is False only where the request certainly never left:
    the connection (to Plural or the proxy), the TLS handshake or the URL failed.
    """
    where = f"{method} {path}"
    chain = _chain(exc)
    root = chain[-1]
    if answered:
        if any(isinstance(e, (ReadTimeoutError, requests.exceptions.ReadTimeout, TimeoutError)) for e in chain):
            return PluralTimeout(f"the answer to {where} did not arrive in time; it may have been processed",
                                 request_id=request_id)
        return PluralConnectionError(f"the answer to {where} broke off ({type(root).__name__})",
                                     request_id=request_id)
    if isinstance(exc, requests.exceptions.ProxyError):
        return PluralConnectionError(f"the proxy failed {where} ({_proxy_reason(root)})", request_id=request_id,
                                     sent=False)
    if isinstance(exc, requests.exceptions.SSLError):
        # Only the handshake raises this: once it is done, Python's ssl reads a hang-up as the
        # end of the stream (suppress_ragged_eofs), which urllib3 reports as a ProtocolError.
        return PluralTLSError(f"TLS failed on {where} ({_tls_reason(root)}): check the certificate, "
                              "the host name and any proxy", request_id=request_id, sent=False)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return PluralTimeout(f"connecting for {where} timed out", request_id=request_id, sent=False)
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return PluralTimeout(f"no answer to {where} within the read timeout; it may have been "
                             "processed", request_id=request_id)
    if isinstance(exc, requests.exceptions.ConnectionError):
        # Refused or unresolvable: urllib3's NewConnectionError (NameResolutionError is one).
        unsent = any(isinstance(e, NewConnectionError) for e in chain)
        return PluralConnectionError(f"connection to Plural failed on {where} ({type(root).__name__})",
                                     request_id=request_id, sent=not unsent)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return PluralConnectionError(f"the answer to {where} broke off ({type(root).__name__})",
                                     request_id=request_id)
    if isinstance(exc, _NOT_SENT):
        # A bug or a bad setting, not worth retrying.
        return PluralError(f"request {where} could not be sent ({type(exc).__name__})", request_id=request_id,
                           sent=False)
    if isinstance(exc, OSError) and not isinstance(exc, requests.RequestException):
        # Raised before any connection: requests found no CA bundle at the configured path.
        return PluralTLSError(f"TLS could not be set up for {where} ({type(exc).__name__}): check "
                              "REQUESTS_CA_BUNDLE / SSL_CERT_FILE", request_id=request_id, sent=False)
    return PluralError(f"request {where} failed ({type(exc).__name__})", request_id=request_id)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it wraps (requests' over urllib3's over the socket's), outermost first."""
    chain = [exc]
    for _ in range(12):
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in reversed(exc.args) if isinstance(a, BaseException)), None)
        if inner is None:
            inner = exc.__cause__ or exc.__context__
        if inner is None or inner in chain:
            break
        chain.append(inner)
        exc = inner
    return chain


def _proxy_reason(root: BaseException) -> str:
    # http.client's "Tunnel connection failed: 407 Proxy Authentication Required" names the
    # proxy's answer; it never holds the proxy URL or its credentials.
    text = str(root)
    if text.startswith("Tunnel connection failed"):
        return text[:80]
    return type(root).__name__


def _tls_reason(root: BaseException) -> str:
    # OpenSSL's verify message ("self-signed certificate") names the fault, not any secret.
    if isinstance(root, ssl.SSLCertVerificationError) and root.verify_message:
        return str(root.verify_message)[:80]
    return type(root).__name__


def _json_kind(body: Any) -> str:
    """What kind of JSON value ``body`` is (``JSON object``, ``JSON list``...), never its content."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return "JSON " + kinds.get(type(body), "number")
