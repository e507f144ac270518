"""The HTTP client for Plural (Pine Labs online): Generate Token and the payment-link calls.

One urllib3 connection pool, explicit connect and read timeouts on every call,
certificates always verified, redirects never followed, and no retries here:
retrying (with the same Request-ID) is the cancel task's job, so this client makes
each attempt exactly once, except for the single re-try after a rejected token.

Every failure is a :class:`worker.errors.PluralError` carrying the Request-ID; no
message, log line or ``repr`` holds the token, the client secret or a response body.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote, urlsplit

import certifi
import urllib3
from urllib3.exceptions import (ConnectTimeoutError, DecodeError, NewConnectionError, ProtocolError, ProxyError,
                                ReadTimeoutError, SSLError)

from worker.errors import (PluralAuthError, PluralBadResponse, PluralConnectionError, PluralError,
                           PluralTimeout, PluralTLSError, classify_http)
from worker.links import LinkFormatError, PaymentLink, format_timestamp, parse_timestamp
from worker.tokens import AccessToken, MemoryTokenStore, TokenStore
# The one definition of a valid id, shared with the producer API; re-exported from here.
from worker.validation import validate_payment_link_id, validate_request_id

log = logging.getLogger(__name__)

USER_AGENT = f"plural-cancel/0.1.0 urllib3/{urllib3.__version__}"
POOL_SIZE = 128
"""Connections kept open per host: one per thread of a worker process (``config.celery``)."""
MAX_BODY = 1 << 20
"""Bytes of an answer's body (decompressed) read at most: a link is a few KB."""
FALLBACK_TOKEN_LIFETIME = 300.0
"""Seconds a token is trusted when Generate Token gave no readable expiry (a 401 ends it sooner)."""

# merchant_payment_link_reference: 1-50 of A-Za-z0-9-_, as documented for create.
_REFERENCE = re.compile(r"[A-Za-z0-9_-]{1,50}")


def new_request_id() -> str:
    """A fresh GUID for the Request-ID header."""
    return str(uuid.uuid4())


def new_pool(base_url: str, *, pool_maxsize: int = POOL_SIZE, proxy_url: str | None = None,
             ca_bundle: str | None = None) -> urllib3.PoolManager | urllib3.HTTPConnectionPool:
    """A keep-alive connection pool for Plural's host (through ``proxy_url`` when given).

    urllib3 itself rather than a ``requests.Session`` over it: the session's layers
    (cookies, hooks, environment look-ups, adapters) cost about 0.45 ms of CPU a call,
    a tenth of what a whole cancel costs a worker, which is CPU-bound (``bench/README.md``).
    Certificates are verified against ``ca_bundle``, else certifi's bundle (as requests does).
    """
    tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_bundle or certifi.where()}
    # retries=False: urllib3 must not silently resend a PUT; the task retries with backoff,
    # a rate-limit slot and the ledger's knowledge, which urllib3 does not have.
    options = {"maxsize": pool_maxsize, "block": False, "retries": False}
    if proxy_url:
        return urllib3.ProxyManager(proxy_url, num_pools=4, **options, **tls)
    if base_url.startswith("https://"):
        return urllib3.connection_from_url(base_url, **options, **tls)
    return urllib3.connection_from_url(base_url, **options)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer from Plural, its body read whole (within the call's deadline)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class PluralClient:
    """Plural's Generate Token and payment-link endpoints.

    ``base_url`` ends in ``/api`` (``https://pluraluat.v2.pinepg.in/api``); timeouts are in
    seconds; ``clock`` gives epoch seconds (for ``Request-Timestamp`` and token expiry).
    Thread-safe: one client may serve every thread of a worker process.
    """

    def __init__(self, base_url: str, client_id: str | None, client_secret: str | None, *,
                 tokens: TokenStore | None = None, connect_timeout: float = 3.05,
                 read_timeout: float = 15.0, proxy_url: str | None = None, ca_bundle: str | None = None,
                 clock: Callable[[], float] = time.time):
        if not base_url.startswith(("https://", "http://")):
            raise ValueError("base_url must be an http(s) URL such as https://pluraluat.v2.pinepg.in/api")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        self._tokens: TokenStore = tokens if tokens is not None else MemoryTokenStore(clock)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._local = threading.local()  # each worker thread's attempt deadline (see ``within``)
        self._pool = new_pool(self.base_url, proxy_url=proxy_url, ca_bundle=ca_bundle)
        # A pool for Plural's host takes paths; a proxy takes whole URLs.
        self._target = self.base_url if proxy_url else urlsplit(self.base_url).path

    @classmethod
    def from_settings(cls, settings, tokens: TokenStore | None = None, *,
                      clock: Callable[[], float] = time.time) -> "PluralClient":
        """A client for ``config.settings.Settings`` (base URL, credentials, timeouts)."""
        secret = settings.client_secret.reveal() if settings.client_secret else None
        return cls(settings.plural_base_url, settings.client_id, secret, tokens=tokens, clock=clock,
                   connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
                   proxy_url=settings.plural_proxy, ca_bundle=settings.ca_bundle)

    def __repr__(self) -> str:
        return f"PluralClient(base_url={self.base_url!r}, client_id={self.client_id!r})"

    def __enter__(self) -> "PluralClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        if isinstance(self._pool, urllib3.PoolManager):
            self._pool.clear()
        else:
            self._pool.close()

    @contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        """Every call this thread makes inside the block ends within ``seconds`` from now, all
        told: the token, the PUT and the GET share one deadline. Each call's connect and read
        timeouts are cut to the time left, and the body is read against it too, so a body
        trickled byte by byte cannot hold the call past it (urllib3's read timeout is per read)."""
        self._local.deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self._local.deadline = None

    # -- Generate Token ---------------------------------------------------------------

    def generate_token(self, request_id: str | None = None) -> AccessToken:
        """Call Generate Token. Refused credentials (any final 4xx) raise :class:`PluralAuthError`.

        A 5xx, 429, timeout or connection failure raises the retryable error it is.
        """
        request_id = validate_request_id(request_id) if request_id is not None else new_request_id()
        if not self.client_id or not self._client_secret:
            raise PluralAuthError("Plural credentials are not configured: set PLURAL_CLIENT_ID and "
                                  "PLURAL_CLIENT_SECRET", request_id=request_id)
        body = {"client_id": self.client_id, "client_secret": self._client_secret,
                "grant_type": "client_credentials"}
        started = self._clock()
        answer = self._send("POST", "/auth/v1/token", request_id, json_body=body)
        try:
            data = self._read(answer, request_id)
        except PluralError as exc:
            if exc.retryable or exc.http_status is None or not 400 <= exc.http_status < 500:
                raise
            # 401/422 (and any other final 4xx) here mean the credentials or the base URL
            # are wrong: a configuration error that no retry can fix.
            raise PluralAuthError(
                f"Generate Token refused the credentials: {self._scrub(exc.message)}",
                http_status=exc.http_status, code=exc.code, details=exc.details,
                request_id=request_id) from None
        value = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise PluralBadResponse("Generate Token answered without an access_token",
                                    http_status=answer.status, request_id=request_id)
        return AccessToken(value=value, expires_at=self._expiry(data, started, request_id))

    def _expiry(self, data: dict, started: float, request_id: str) -> float:
        """Epoch seconds at which the token expires, from ``expires_at`` or ``expires_in``."""
        try:
            when = parse_timestamp(data.get("expires_at"), "expires_at")
        except LinkFormatError:
            when = None
        if when is not None:
            if when.timestamp() <= self._clock():
                log.warning("plural token expires_at is already past by this host's clock; "
                            "check clock sync (request_id=%s)", request_id)
            return when.timestamp()
        expires_in = data.get("expires_in")
        if isinstance(expires_in, str) and expires_in.strip().isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
            # Counted from when we asked, so time spent in transit only shortens our view of it.
            return started + float(expires_in)
        log.warning("plural token came without a readable expiry; trusting it for %.0f s "
                    "(request_id=%s)", FALLBACK_TOKEN_LIFETIME, request_id)
        return self._clock() + FALLBACK_TOKEN_LIFETIME

    # -- Payment links ----------------------------------------------------------------

    def cancel_payment_link(self, payment_link_id: str, request_id: str) -> PaymentLink:
        """Cancel a link (``PUT /pay/v1/paymentlink/{id}/cancel``); returns the link Plural sent back.

        ``request_id`` is the idempotency key: the caller sends the same one on every attempt.
        Raises ValueError (nothing sent) for a malformed id, else a :class:`PluralError`.
        """
        validate_payment_link_id(payment_link_id)
        validate_request_id(request_id)
        path = f"/pay/v1/paymentlink/{quote(payment_link_id, safe='')}/cancel"
        return self._link(self._bearer("PUT", path, request_id), request_id)

    def get_payment_link(self, payment_link_id: str, request_id: str | None = None) -> PaymentLink:
        """Fetch a link (``GET /pay/v1/paymentlink/{id}``), e.g. to learn why a cancel was refused."""
        validate_payment_link_id(payment_link_id)
        request_id = validate_request_id(request_id) if request_id is not None else new_request_id()
        path = f"/pay/v1/paymentlink/{quote(payment_link_id, safe='')}"
        return self._link(self._bearer("GET", path, request_id), request_id)

    def create_payment_link(self, amount_paisa: int, merchant_reference: str, *, currency: str = "INR",
                            request_id: str | None = None, **extra: Any) -> PaymentLink:
        """Create a link for ``amount_paisa`` (integer paisa); ``extra`` adds Plural's optional fields."""
        if not isinstance(amount_paisa, int) or isinstance(amount_paisa, bool) or amount_paisa <= 0:
            raise ValueError("amount_paisa must be a positive integer (paisa)")
        if not isinstance(merchant_reference, str) or not _REFERENCE.fullmatch(merchant_reference):
            raise ValueError("merchant_reference must be 1 to 50 characters of A-Z a-z 0-9 _ -")
        request_id = validate_request_id(request_id) if request_id is not None else new_request_id()
        body = {**extra, "amount": {"value": amount_paisa, "currency": currency},
                "merchant_payment_link_reference": merchant_reference}
        return self._link(self._bearer("POST", "/pay/v1/paymentlink", request_id, json_body=body),
                          request_id)

    # -- Machinery --------------------------------------------------------------------

    def _bearer(self, method: str, path: str, request_id: str, json_body: Any = None) -> Any:
        """One bearer call, re-tried once with a fresh token after a 401; returns the parsed JSON."""
        token = self._token(request_id)
        answer = self._send(method, path, request_id, token=token, json_body=json_body)
        if answer.status == 401:
            # Expired early, revoked, or rotated by another process: drop it and try once more
            # with the same Request-ID; a second 401 is a real authentication failure.
            self._tokens.invalidate(token)
            token = self._token(request_id)
            answer = self._send(method, path, request_id, token=token, json_body=json_body)
        return self._read(answer, request_id, token)

    def _token(self, request_id: str) -> str:
        try:
            return self._tokens.get(self.generate_token)
        except PluralError as exc:
            # Report the failure under the caller's Request-ID; the token call had its own.
            if not exc.message.startswith("Generate Token"):
                exc.message = f"Generate Token failed: {exc.message}"
                exc.args = (exc.message,)
            exc.request_id = request_id
            raise

    def _send(self, method: str, path: str, request_id: str, *, token: str | None = None,
              json_body: Any = None) -> Answer:
        timeout = urllib3.Timeout(connect=self._connect_timeout, read=self._read_timeout)
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PluralTimeout(f"the attempt's time ran out before {method} {path} was sent",
                                    request_id=request_id)
            timeout = urllib3.Timeout(connect=min(self._connect_timeout, left), read=min(self._read_timeout, left))
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Request-ID": request_id,
            "Request-Timestamp": format_timestamp(self._clock()),
            "User-Agent": USER_AGENT,
        }
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if json_body is None:
            # No body: the seed defines none, and "{}" could be read by a strict validator
            # as an (empty) update. "Content-Length: 0" keeps proxies that refuse a
            # length-less PUT (411 Length Required) happy.
            data = None
            if method not in ("GET", "HEAD"):
                headers["Content-Length"] = "0"
        else:
            data = json.dumps(json_body, separators=(",", ":")).encode()
        started = time.monotonic()
        try:
            response = self._pool.urlopen(method, self._target + path, body=data, headers=headers,
                                          timeout=timeout, retries=False, redirect=False, preload_content=False)
            answer = Answer(response.status, response.headers, _read_body(response, deadline, self._read_timeout))
        except urllib3.exceptions.HTTPError as exc:
            elapsed = (time.monotonic() - started) * 1000
            log.debug("plural %s %s failed (%s) in %.0f ms request_id=%s", method, path,
                      type(exc).__name__, elapsed, request_id)
            raise _transport_error(exc, method, path, request_id) from exc
        except _BodyTooLarge:
            raise PluralBadResponse(f"Plural's answer to {method} {path} is larger than {MAX_BODY} bytes; "
                                    "not read", request_id=request_id) from None
        elapsed = (time.monotonic() - started) * 1000
        log.debug("plural %s %s -> %s in %.0f ms request_id=%s", method, path,
                  answer.status, elapsed, request_id)
        return answer

    def _read(self, answer: Answer, request_id: str, token: str | None = None) -> Any:
        """The parsed JSON of a 2xx answer; any other answer raises what :func:`classify_http` says."""
        status = answer.status
        body, note = _parse_json(answer)
        if not 200 <= status < 300:
            error = classify_http(status, body, request_id=request_id, body_note=note,
                                  retry_after=answer.headers.get("Retry-After"), now=self._clock())
            error.message = self._scrub(error.message, token)
            error.args = (error.message,)
            raise error
        if note:
            raise PluralBadResponse(f"Plural answered HTTP {status} but the {note}",
                                    http_status=status, request_id=request_id)
        return body

    def _link(self, body: Any, request_id: str) -> PaymentLink:
        try:
            return PaymentLink.from_dict(body)
        except LinkFormatError as exc:
            raise PluralBadResponse(f"Plural's payment link is malformed: {exc}",
                                    http_status=200, request_id=request_id) from None

    def _scrub(self, text: str, token: str | None = None) -> str:
        """``text`` with the client secret and ``token`` masked, in case Plural ever echoes them."""
        for secret in (self._client_secret, token):
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text


class _BodyTooLarge(Exception):
    """An answer's body went past :data:`MAX_BODY` (decompressed)."""


def _read_body(response: urllib3.BaseHTTPResponse, deadline: float | None, read_timeout: float) -> bytes:
    """The whole body of ``response`` (decompressed), at most :data:`MAX_BODY` bytes, read by
    ``deadline`` (monotonic seconds; None: only the per-read timeout applies).

    Each read waits at most the time left: the socket's timeout is cut before every read,
    so neither a trickled body nor a gzip bomb can hold the call or the memory.
    """
    chunks, size = [], 0
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReadTimeoutError(None, None, "the attempt's deadline passed while reading the answer")
                sock = getattr(response.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(min(read_timeout, left))
            chunk = response.read1(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_BODY:
                raise _BodyTooLarge()
            chunks.append(chunk)
    except BaseException:
        response.close()  # a half-read connection must never go back to the pool
        raise
    finally:
        response.release_conn()


def _parse_json(answer: Answer) -> tuple[Any, str]:
    """(parsed JSON, "") or (None, a description of why the body is unreadable, without its content)."""
    raw = answer.body
    if not raw.strip():
        return None, "body is empty"
    try:
        return json.loads(raw), ""
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        media = (answer.headers.get("Content-Type") or "no content type").split(";")[0].strip()
        media = re.sub(r"[^A-Za-z0-9.+/-]", "", media)[:60] or "no content type"
        return None, f"body is not JSON ({media}, {len(raw)} bytes)"


def _transport_error(exc: urllib3.exceptions.HTTPError, method: str, path: str,
                     request_id: str) -> PluralError:
    """The :class:`PluralError` for a failure below HTTP (no answer, or a broken one)."""
    where = f"{method} {path}"
    if isinstance(exc, SSLError):
        return PluralTLSError(f"TLS failed on {where} ({_tls_reason(exc)}): check the certificate, "
                              "the host name and any proxy", request_id=request_id)
    # NewConnectionError (refused, unresolvable) is a ConnectTimeoutError to urllib3: test it first.
    if isinstance(exc, (NewConnectionError, ProxyError, ProtocolError, DecodeError)):
        return PluralConnectionError(f"connection to Plural failed on {where} ({_root_cause(exc)})",
                                     request_id=request_id)
    if isinstance(exc, ConnectTimeoutError):
        return PluralTimeout(f"connecting for {where} timed out", request_id=request_id)
    if isinstance(exc, ReadTimeoutError):
        return PluralTimeout(f"no answer to {where} within the read timeout; it may have been "
                             "processed", request_id=request_id)
    # LocationParseError and the like: a bug or a bad setting, not worth retrying.
    return PluralError(f"request {where} could not be sent ({type(exc).__name__})", request_id=request_id)


def _root_cause(exc: BaseException, *, name: bool = True) -> Any:
    """The innermost error under urllib3's wrappers, or its class name (e.g. ConnectionResetError)."""
    for _ in range(8):
        if exc.args and isinstance(exc.args[-1], BaseException):
            exc = exc.args[-1]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return type(exc).__name__ if name else exc


def _tls_reason(exc: BaseException) -> str:
    root = _root_cause(exc, name=False)
    # OpenSSL's verify message ("self-signed certificate") names the fault, not any secret.
    if isinstance(root, ssl.SSLCertVerificationError) and root.verify_message:
        return str(root.verify_message)[:80]
    return type(root).__name__
