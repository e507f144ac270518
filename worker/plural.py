"""The HTTP client for Plural (Pine Labs online): Generate Token and the payment-link calls.

One ``requests.Session`` with one sized connection pool, explicit connect and read
timeouts on every call, certificates always verified, redirects never followed, and
no retries here: retrying (with the same Request-ID) is the cancel task's job, so this
client makes each attempt exactly once, except for the single re-try after a rejected
token. Proxy and CA bundle come from :class:`config.settings.Settings`; the session
never reads the environment itself.

Every failure is a :class:`plural_cancel.errors.PluralError` carrying the Request-ID; no
message, log line or ``repr`` holds the token, the client secret or a response body.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError

from plural_cancel.config.settings import plain_http_allowed
from plural_cancel.errors import (
    LinkFormatError,
    PluralAuthError,
    PluralBadResponse,
    PluralError,
    PluralTimeout,
    SlotMissed,
)
from plural_cancel.worker.classify import TOKEN_CODES, classify_http, classify_transport
from plural_cancel.worker.links import PaymentLink, format_timestamp, parse_timestamp
from plural_cancel.worker.policy import TOKEN_REFRESHES
from plural_cancel.worker.tokens import AccessToken, MemoryTokenStore, TokenStore

# The one definition of a valid id, shared with the producer API; re-exported from here.
from plural_cancel.worker.validation import validate_payment_link_id, validate_request_id

log = logging.getLogger(__name__)

USER_AGENT = f"plural-cancel/0.1.0 python-requests/{requests.__version__}"
POOL_SIZE = 128
"""Connections kept open per host: one per thread of a worker process (``config.celery``)."""
MAX_BODY = 1 << 20
"""Bytes of an answer's body (decompressed) read at most: a link is a few KB."""
FALLBACK_TOKEN_LIFETIME = 300.0
"""Seconds a token is trusted when Generate Token gave no readable expiry (a 401 ends it sooner)."""

def new_request_id() -> str:
    """A fresh GUID for the Request-ID header."""
    return str(uuid.uuid4())


def new_session(base_url: str, *, pool_maxsize: int = POOL_SIZE, proxy_url: str | None = None,
                ca_bundle: str | None = None) -> requests.Session:
    """A keep-alive session for Plural's host (through ``proxy_url`` when given).

    Certificates are verified against ``ca_bundle``, else certifi's bundle (requests'
    default). Credentials in ``proxy_url`` are sent as ``Proxy-Authorization``.
    """
    session = requests.Session()
    # Settings read HTTPS_PROXY, NO_PROXY and the CA bundle once, at start-up; the session
    # must not look again (and differently) on every call.
    session.trust_env = False
    session.verify = ca_bundle or True
    if proxy_url:
        session.proxies = {urlsplit(base_url).scheme: proxy_url}
    session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json",
                            "Content-Type": "application/json"})
    # max_retries=0: urllib3 must not silently resend a PUT; the task retries with backoff,
    # a rate-limit slot and the ledger's knowledge, which urllib3 does not have.
    # pool_block=False: a thread never waits for a connection; past pool_maxsize one is
    # opened and dropped after use.
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0, pool_block=False)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


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
        if not plain_http_allowed(base_url):
            # The secret and the bearer token must not cross a network in clear text.
            raise ValueError("base_url must be https (plain http only to a loopback host: 127.0.0.1, ::1, "
                             "localhost)")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        self._tokens: TokenStore = tokens if tokens is not None else MemoryTokenStore(clock)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._local = threading.local()  # each worker thread's attempt deadline (see ``within``)
        self._session = new_session(self.base_url, proxy_url=proxy_url, ca_bundle=ca_bundle)
        self._adapter = self._session.get_adapter(self.base_url)
        self._url = requests.Request("GET", self.base_url).prepare().url.rstrip("/")  # InvalidURL here, once

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
        """Close the session's connections."""
        self._session.close()

    @contextmanager
    def within(self, seconds: float, send_by: float | None = None) -> Iterator[None]:
        """Every call this thread makes inside the block ends within ``seconds`` from now, all
        told: the token, the PUT and the GET share one deadline. Each call's connect and read
        timeouts are cut to the time left, and the body is read against it too, so a body
        trickled byte by byte cannot hold the call past it (urllib3's read timeout is per read).

        ``send_by`` (a ``time.monotonic()`` value): the block's first payment-link call, once
        its token is had, is not sent later than this; ``SlotMissed`` is raised instead.
        The calls after it (a GET, the retry with a fresh token) are not held to it. That
        call's ``Request-Timestamp`` is the very reading checked against ``send_by``, so what
        Plural is told of a call's sending is what the rate limit held it to."""
        self._local.deadline = time.monotonic() + seconds
        # On the client's clock, which stamps Request-Timestamp. Read before the monotonic
        # clock, so that a pause between the two readings can only move it earlier.
        self._local.send_by = None if send_by is None else self._clock() + (send_by - time.monotonic())
        try:
            yield
        finally:
            self._local.deadline = None
            self._local.send_by = None

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
        started = time.monotonic()
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
        return self._expiry(value, data, started, request_id)

    def _expiry(self, value: str, data: dict, started: float, request_id: str) -> AccessToken:
        """The token with its expiry as Plural gave it, ``expires_at`` (judged by the token
        store on its clock: Redis's for the shared cache) or ``expires_in``; ``started``: the
        ``time.monotonic()`` reading when it was asked for."""
        try:
            when = parse_timestamp(data.get("expires_at"), "expires_at")
        except LinkFormatError:
            when = None
        if when is not None:
            return AccessToken(value=value, expires_at=when.timestamp())
        expires_in = data.get("expires_in")
        if isinstance(expires_in, str) and expires_in.strip().isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
            # Counted from when we asked, so time spent in transit only shortens our view of it.
            return AccessToken(value=value, expires_in=float(expires_in) - (time.monotonic() - started))
        log.warning("plural token came without a readable expiry; trusting it for %.0f s "
                    "(request_id=%s)", FALLBACK_TOKEN_LIFETIME, request_id)
        return AccessToken(value=value, expires_in=FALLBACK_TOKEN_LIFETIME)

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

    # -- Machinery --------------------------------------------------------------------

    def _bearer(self, method: str, path: str, request_id: str, json_body: Any = None) -> Any:
        """One bearer call, re-tried once with a fresh token after a rejected one; returns the parsed JSON."""
        # Plural's own client sends an Idempotency-Key on every PUT and POST. The same key on
        # every attempt may let Plural drop a repeat; nothing public promises it, so the
        # ledger stays the guarantee.
        key = request_id if method in ("PUT", "POST") else None
        token = self._token(request_id, sent=False)
        send_by, self._local.send_by = getattr(self._local, "send_by", None), None
        stamp = self._clock()
        if send_by is not None and stamp > send_by:
            raise SlotMissed(f"{method} {path} not sent: {stamp - send_by:.3f}s past its send-by time")
        answer = self._send(method, path, request_id, token=token, json_body=json_body,
                            idempotency_key=key, stamp=stamp)
        for _ in range(TOKEN_REFRESHES):
            if not _token_refused(answer):
                break
            # Expired early, revoked, or rotated by another process: drop it and send the call
            # again with the same Request-ID (the retry policy says how often).
            self._tokens.invalidate(token)
            token = self._token(request_id, sent=True)
            answer = self._send(method, path, request_id, token=token, json_body=json_body, idempotency_key=key)
        return self._read(answer, request_id, token)

    def _token(self, request_id: str, *, sent: bool) -> str:
        """The bearer token; a failure is reported under ``request_id``, ``sent`` saying
        whether this call already reached Plural (the try before a rejected token did)."""
        try:
            return self._tokens.get(self.generate_token)
        except PluralError as exc:
            # Report the failure under the caller's Request-ID; the token call had its own.
            if not exc.message.startswith("Generate Token"):
                exc.message = f"Generate Token failed: {exc.message}"
                exc.args = (exc.message,)
            exc.request_id = request_id
            exc.sent = sent
            raise

    def _send(self, method: str, path: str, request_id: str, *, token: str | None = None,
              json_body: Any = None, idempotency_key: str | None = None, stamp: float | None = None) -> Answer:
        """One call; ``stamp`` (the client's clock, epoch seconds) is its ``Request-Timestamp``, now if None."""
        connect, read = self._connect_timeout, self._read_timeout
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PluralTimeout(f"the attempt's time ran out before {method} {path} was sent",
                                    request_id=request_id, sent=False)
            connect, read = min(connect, left), min(read, left)
        headers = {"Request-ID": request_id,
                   "Request-Timestamp": format_timestamp(self._clock() if stamp is None else stamp)}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        # No body on GET and the cancel's PUT: the seed defines none, and "{}" could be read
        # by a strict validator as an (empty) update. requests sends "Content-Length: 0" on a
        # body-less PUT, which keeps proxies that refuse a length-less PUT (411) happy.
        data = None if json_body is None else json.dumps(json_body, separators=(",", ":")).encode()
        started = time.monotonic()
        try:
            request = self._prepare(method, path, headers, data)
            # The adapter, not Session.send: even with allow_redirects=False, Session.send
            # reads a 3xx's whole body (to offer response.next) past the size cap and the
            # deadline, and it would keep cookies a load balancer sets for every later call.
            response = self._adapter.send(request, stream=True, timeout=(connect, read),
                                          verify=self._session.verify, proxies=self._session.proxies)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._failed(exc, method, path, request_id, started, answered=False) from exc
        try:
            answer = Answer(response.status_code, response.headers,
                            _read_body(response.raw, deadline, self._read_timeout))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._failed(exc, method, path, request_id, started, answered=True) from exc
        except _BodyTooLarge:
            raise PluralBadResponse(f"Plural's answer to {method} {path} is larger than {MAX_BODY} bytes; "
                                    "not read", http_status=response.status_code, request_id=request_id) from None
        elapsed = (time.monotonic() - started) * 1000
        log.debug("plural %s %s -> %s in %.0f ms request_id=%s", method, path,
                  answer.status, elapsed, request_id)
        return answer

    def _prepare(self, method: str, path: str, headers: dict[str, str], data: bytes | None) -> requests.PreparedRequest:
        """The request as requests' adapter takes it, with the session's headers.

        Built from PreparedRequest's own steps rather than Session.prepare_request, which
        merges cookies, auth, hooks and settings this client never uses, at a cost in CPU a
        call (``bench/README.md``). The URL is the base checked once in ``__init__`` plus a path of
        quoted, validated parts, so it is not parsed again.
        """
        request = requests.PreparedRequest()
        request.prepare_method(method)
        request.url = self._url + path
        request.prepare_headers({**self._session.headers, **headers})  # refuses CR/LF in a value
        request.body = data
        request.prepare_content_length(data)
        return request

    def _failed(self, exc: BaseException, method: str, path: str, request_id: str, started: float, *,
                answered: bool) -> PluralError:
        elapsed = (time.monotonic() - started) * 1000
        log.debug("plural %s %s failed (%s) in %.0f ms request_id=%s", method, path,
                  type(exc).__name__, elapsed, request_id)
        return classify_transport(exc, method, path, request_id, answered=answered)

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


def _read_body(raw: urllib3.BaseHTTPResponse, deadline: float | None, read_timeout: float) -> bytes:
    """The whole body of ``raw`` (decompressed), at most :data:`MAX_BODY` bytes, read by
    ``deadline`` (monotonic seconds; None: only the per-read timeout applies).

    Each read waits at most the time left: the socket's timeout is cut before every read,
    so neither a trickled body nor a gzip bomb can hold the call or the memory. urllib3
    inflates at most the bytes asked for per read, so a bomb is stopped a chunk past the cap.
    """
    chunks, size = [], 0
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReadTimeoutError(None, None, "the attempt's deadline passed while reading the answer")
                sock = getattr(raw.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(min(read_timeout, left))
            # requests asks urllib3 not to decode (it decodes in iter_content); read here, it must.
            chunk = raw.read1(65536, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_BODY:
                raise _BodyTooLarge()
            chunks.append(chunk)
    except BaseException:
        raw.close()  # a half-read connection must never go back to the pool
        raise
    finally:
        raw.release_conn()


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


def _token_refused(answer: Answer) -> bool:
    """Whether ``answer`` says the bearer token was not accepted: a 401, or any 4xx whose Plural
    code says so (Plural documents USER_AUTHENTICATION_FAILED with 422)."""
    if answer.status == 401:
        return True
    if not 400 <= answer.status < 500:
        return False
    body, _ = _parse_json(answer)
    return isinstance(body, dict) and body.get("code") in TOKEN_CODES
