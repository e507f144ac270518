"""Answers before they hit the wire: JSON bodies, Plural's error shapes, a proxy's HTML page."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable


def _encoder() -> Callable[[Any], bytes]:
    """Compact UTF-8 JSON: orjson's when it is installed (the ``sandbox`` extra brings it),
    else the standard library's. A cancel's answer is a whole link, and orjson encodes it
    several times faster (``bench/README.md``, sandbox cancels per second)."""
    try:
        import orjson
    except ImportError:
        encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        return lambda payload: encode(payload).encode("utf-8")
    return orjson.dumps


_dumps = _encoder()


@dataclass(slots=True)
class Reply:
    """What to answer one request with, and how."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] | None = None
    delay: float = 0.0
    """Seconds to hold the answer (latency and timeout faults)."""
    reset: bool = False
    """Answer nothing: close the connection with a TCP RST (after ``delay``)."""


def json_reply(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, _dumps(payload), headers=headers)


def plural_error(status: int, code: str, message: str, *, details_key: str | None = None,
                 source: str | None = None, step: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> Reply:
    """Plural's error body: ``{"code", "message"}`` and, when ``details_key`` is given, a
    details object under that key (``additionalErrorPayload`` or
    ``additional_error_details``: Plural uses both) carrying ``source`` and ``step``."""
    payload: dict[str, Any] = {"code": code, "message": message}
    if details_key:
        payload[details_key] = {"source": source, "step": step}
    return json_reply(status, payload, headers)


def invalid_request(message: str, **kw: Any) -> Reply:
    return plural_error(400, "INVALID_REQUEST", message, **kw)


def unauthorized(message: str) -> Reply:
    return plural_error(401, "UNAUTHORIZED", message)


def not_found(message: str, step: str) -> Reply:
    return plural_error(404, "NOT_FOUND", message, details_key="additionalErrorPayload",
                        source="PAYMENT_LINK", step=step)


def method_not_allowed(allowed: str) -> Reply:
    reply = plural_error(405, "METHOD_NOT_ALLOWED", f"method not allowed; use {allowed}")
    reply.headers = [("Allow", allowed)]
    return reply


_PROXY_PAGE = ("<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
               "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
               "</body>\r\n</html>\r\n")


def injected(status: int, step: str, retry_after: int) -> Reply:
    """An answer forced by a fault, shaped like what a client really meets for that status
    (400: Plural's throttle; 429: with ``Retry-After``, ``retry_after`` seconds)."""
    if status in (502, 504):
        reason = "Bad Gateway" if status == 502 else "Gateway Time-out"
        page = _PROXY_PAGE.format(status=status, reason=reason).encode("ascii")
        return Reply(status, page, content_type="text/html")
    if status == 400:
        # A throttle in Plural's own words: its tooling knows PAYMENT_RATE_LIMIT, and nothing
        # says it comes with a 429 or a Retry-After, so a client must read the code.
        return plural_error(400, "PAYMENT_RATE_LIMIT", "payment rate limit exceeded; try again later")
    if status == 429:
        return plural_error(429, "RATE_LIMITED",
                            f"too many requests; retry after {retry_after} seconds",
                            headers=[("Retry-After", str(retry_after))])
    if status == 503:
        return plural_error(503, "INTERNAL_ERROR", "service temporarily unavailable",
                            details_key="additionalErrorPayload", source="OMS", step=step)
    return plural_error(status, "INTERNAL_ERROR", "failed to process because of an internal error",
                        details_key="additionalErrorPayload", source="OMS", step=step)
