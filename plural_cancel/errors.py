"""Every error this product raises, under one base: catch :class:`PluralCancelError` to
catch any of them.

Bad input and settings are also ``ValueError``s, a Redis that could not keep a promise
also a ``redis.RedisError``. The errors of talking to Plural (:class:`PluralError` and
below) carry what an on-call engineer needs (HTTP status, Plural's code and message, its
details, the Request-ID), whether the call may have left this host (``sent``) and whether
trying again can help (``retryable``). Which one an answer or a failure is, is decided in
``plural_cancel.worker.classify``; whether that kind is retried, in the retry policy,
``plural_cancel.worker.policy``.

Messages never hold a response body, a token or a secret: bodies can carry customer
personal data, and messages end up in logs, Sentry and the status record.

Kept at the top of the package, apart from ``worker``, because every layer raises them
(``config`` too, which ``worker`` imports: this module imports nothing of the product).
"""

from __future__ import annotations

from typing import Any, Mapping

MAX_MESSAGE = 300
"""Characters of Plural's own error message kept (a bound on what reaches logs and Redis)."""

MAX_SHOWN_SETTING = 40
"""Characters of a refused setting's value repeated in its :class:`ConfigError` (the line stays short)."""


class PluralCancelError(Exception):
    """Base of every error this product raises on purpose."""


# -- bad input and settings: also ValueErrors -------------------------------------------


class ConfigError(PluralCancelError, ValueError):
    """A setting is missing or malformed; the message names the variable and what it accepts."""

    def __init__(self, variable: str, accepts: str, got: str | None = None):
        """``got``: the value refused, repeated (cut short) only where it cannot hold a secret;
        never when it holds an ``@``, as a URL's credentials do (a REDIS_URL pasted into the
        wrong variable)."""
        self.variable = variable
        detail = f"{variable}: must be {accepts}"
        if got is not None and "@" not in got:
            if len(got) > MAX_SHOWN_SETTING:
                got = got[:MAX_SHOWN_SETTING - 3] + "..."
            detail += f" (got {got!r})"
        super().__init__(detail)


class RequestIdConflict(PluralCancelError, ValueError):
    """The Request-ID is already used for a cancel of another payment link."""


class MalformedMessage(PluralCancelError, ValueError):
    """A cancel message whose arguments cannot run; the message names what is wrong, never a value."""


# -- Redis ------------------------------------------------------------------------------
# REDIS_AWAY and NotReplicated are made of redis-py's errors, and built when first asked
# for (PEP 562): the settings import this module, and so does the healthcheck every
# container runs every few seconds, which must not pay for loading redis-py.


def _redis_errors() -> dict[str, Any]:
    import redis

    away = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

    class NotReplicated(PluralCancelError, redis.RedisError):
        """The master took an enqueue's records but fewer replicas than ``REDIS_WAIT_REPLICAS``
        acknowledged them in time: a failover now could lose them. Enqueue again (the same
        Request-IDs are one cancel; a link already live is followed, never sent twice)."""

    NotReplicated.__qualname__ = "NotReplicated"
    return {"REDIS_AWAY": away, "NotReplicated": NotReplicated}


WRITE_REFUSALS = ("OOM", "READONLY", "NOREPLICAS", "MISCONF")
"""Redis's error codes for a write refused for a state that passes: maxmemory reached, a
master demoted in a failover, fewer good replicas than ``min-replicas-to-write``, a disk
that failed the last save (``stop-writes-on-bgsave-error``)."""


def write_refused(error: BaseException) -> bool:
    """Whether ``error`` is Redis refusing a write for a state that passes (:data:`WRITE_REFUSALS`),
    not a fault of the command: the worker rides it out, as it rides out Redis away.

    By the error's code, because redis-py gives only OOM and READONLY classes of their own
    (``NOREPLICAS`` and ``MISCONF`` arrive as a plain ``ResponseError``)."""
    import redis

    return isinstance(error, redis.ResponseError) and _code(error) in WRITE_REFUSALS \
        or isinstance(error, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError))


_PIPELINED = " of pipeline caused error: "
"""What redis-py puts before Redis's own message when a command of a pipeline failed
(``Command # 1 (HSET ...) of pipeline caused error: NOREPLICAS ...``)."""


def _code(error: BaseException) -> str:
    """Redis's error code (its message's first word), from under a pipeline's wording too."""
    text = str(error)
    if _PIPELINED in text:
        text = text.split(_PIPELINED, 1)[1]
    return text.split(" ", 1)[0]


def refusal_code(error: BaseException) -> str:
    """A refused write's name for a log line: Redis's code (``NOREPLICAS``), else the class's."""
    import redis

    code = _code(error)
    if code in WRITE_REFUSALS:
        return code
    if isinstance(error, redis.exceptions.OutOfMemoryError):
        return "OOM"
    if isinstance(error, redis.exceptions.ReadOnlyError):
        return "READONLY"
    return type(error).__name__


def __getattr__(name: str) -> Any:
    """``REDIS_AWAY``: redis-py's errors that say Redis is away (a restart) or no longer the
    master (a failover): no cancel failed, and the ledger carries every live one through it.
    ``NotReplicated``: see :func:`_redis_errors`."""
    if name in ("REDIS_AWAY", "NotReplicated"):
        globals().update(_redis_errors())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- Plural -----------------------------------------------------------------------------


class PluralError(PluralCancelError):
    """Base of every error of talking to Plural."""

    retryable = False
    """Whether this kind of error can mend by trying again: set per kind below, read by the
    retry policy (``plural_cancel.worker.policy``), which alone decides what a retry is."""

    def __init__(self, message: str, *, http_status: int | None = None, code: str | None = None,
                 details: Mapping[str, Any] | None = None, request_id: str | None = None,
                 retry_after: float | None = None, sent: bool = True):
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.details = dict(details or {})
        self.request_id = request_id
        self.retry_after = retry_after
        """Seconds Plural asked us to wait (from ``Retry-After``), or None."""
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
                    request_id=self.request_id, retry_after=self.retry_after, sent=self.sent)

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


class TokenUnavailable(PluralError):
    """No token could be had in time: another process holds the refresh lock and produced
    none. No call was made (``sent`` False); the cancel is tried again later."""

    retryable = True

    def __init__(self, message: str, **kwargs: Any):
        kwargs.setdefault("sent", False)
        super().__init__(message, **kwargs)


class SlotMissed(PluralCancelError):
    """A cancel's PUT would have left later than its rate-limit slot allows (the ``send_by``
    of ``PluralClient.within``): it was not sent, so Plural knows nothing of it. Not a
    :class:`PluralError`: nothing was said to Plural; the cancel takes a new slot."""


class PluralBadResponse(PluralError):
    """Plural's answer could not be read: not JSON, truncated, empty, a redirect, or the wrong shape."""


class LinkFormatError(PluralCancelError, ValueError):
    """Plural's payment-link JSON has the wrong shape; the message names the field, never its value."""
