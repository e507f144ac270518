"""HTTP/1.1 on the wire: parse requests from a byte buffer, render whole responses.

Hand-parsed rather than ``http.server`` because the sandbox must never be the slowest
part of a benchmark: a request is a header block plus a ``Content-Length`` body, and a
response is rendered into one ``bytes`` so that it leaves in one ``send``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote

MAX_HEAD = 64 * 1024
"""Bytes allowed for the request line and headers."""
MAX_BODY = 8 * 1024 * 1024
"""Bytes allowed for a request body."""

_REASONS = {s.value: s.phrase for s in HTTPStatus}


class BadRequest(Exception):
    """The bytes are not an HTTP/1.x request we accept; answer ``status`` and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    """Header names lower-cased; a repeated header keeps its last value."""
    body: bytes
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` if it is not."""
        if not self.body:
            raise ValueError("request body is empty")
        return json.loads(self.body)


def parse(buf: bytearray) -> tuple[Request | None, int, bool]:
    """Parse the first complete request in ``buf``.

    Returns ``(request, bytes_consumed, wants_continue)``; ``request`` is None while the
    request is incomplete, and ``wants_continue`` tells the caller to send
    ``100 Continue`` because the client waits for it before sending the body.
    Raises :class:`BadRequest` for malformed input.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest(431, "request headers too large")
        return None, 0, False
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest(411, "chunked bodies are not supported: send Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise BadRequest(400, "malformed Content-Length")
    length = int(length_text)
    if length > MAX_BODY:
        raise BadRequest(413, "request body too large")
    start = end + 4
    if len(buf) - start < length:
        wants = headers.get("expect", "").lower() == "100-continue"
        return None, 0, wants
    request = Request(method, target, version, headers, bytes(buf[start:start + length]))
    path, _, query = target.partition("?")
    request.path = unquote(path)
    if query:
        request.query = parse_qs(query)
    return request, start + length, False


_date_cache: list = [0, b""]


def _date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = ("Date: " + formatdate(now, usegmt=True) + "\r\n").encode("ascii")
    return _date_cache[1]


def render(status: int, body: bytes, content_type: str = "application/json",
           extra_headers: list[tuple[str, str]] | None = None, close: bool = False) -> bytes:
    """A complete response (status line, headers, body) as one ``bytes``."""
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Server: plural-sandbox\r\n")
    if extra_headers:
        head += "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
    if close:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + _date_header() + b"\r\n" + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
