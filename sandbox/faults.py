"""Switchable faults: what can go wrong between a client and Plural, and the dice for it.

The settings are a frozen :class:`Faults` snapshot replaced as a whole on every update,
so a request always sees one consistent set. The global faults apply to every account; an
account (a client id) may override any of them for its own calls, so one merchant's
outage or limit leaves the others alone. Every random decision goes through
:class:`FaultInjector`'s ``random.Random``, which a test can seed or replace.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from plural_cancel.sandbox.limit import AccountLimit

FAULT_STATUSES = ("429", "500", "502", "503", "504")
"""Statuses ``error_rates`` may inject. 502 and 504 come as a proxy's HTML page."""
MAX_LIMIT_RPS = 1_000_000
"""The highest ``limit_rps``, cancels a second."""


@dataclass(frozen=True)
class Faults:
    """The current faults. Rates are probabilities in [0, 1] drawn per request."""

    latency_ms: float = 0
    """Milliseconds added before every /api answer."""
    error_rates: Mapping[str, float] = field(default_factory=dict)
    """HTTP status (as a string) -> probability of answering it instead of the real answer."""
    retry_after: int = 1
    """Seconds sent in ``Retry-After`` on an injected 429 (``error_rates``, ``throttle_rate``)."""
    limit_rps: float = 0
    """Plural's own limit: cancels a second each account may make (:mod:`sandbox.limit`);
    past it a cancel is answered 429 with ``Retry-After`` the whole seconds, rounded up, to the
    account's next free slot. 0: no limit."""
    throttle_rate: float = 0.0
    """Probability of answering a cancel 429 (with ``retry_after``), whatever the limit."""
    plural_throttle_rate: float = 0.0
    """Probability of answering a cancel 400 ``PAYMENT_RATE_LIMIT``: a throttle in Plural's
    own words, with no ``Retry-After``."""
    outage: bool = False
    """Every /api call answers 503 (Plural JSON)."""
    reset_rate: float = 0.0
    """Probability of closing the connection with a TCP RST and no answer."""
    timeout_rate: float = 0.0
    """Probability of holding the answer ``hang_ms`` (the request *is* processed)."""
    hang_ms: float = 30000
    """Milliseconds a timed-out answer is held."""
    token_ttl: float = 3600
    """Seconds new access tokens live."""
    reject_tokens: bool = False
    """Every bearer token is answered 401."""
    faults_skip_token: bool = False
    """Generate Token is spared every fault (latency included)."""
    link_errors: Mapping[str, str] = field(default_factory=dict)
    """Payment link id -> HTTP status (as a string) answered to every call naming that link:
    a "poison" link that fails whatever the rest of Plural does."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_rates"] = dict(self.error_rates)
        data["link_errors"] = dict(self.link_errors)
        return data

    def updated(self, changes: Mapping[str, Any]) -> "Faults":
        """A copy with ``changes`` applied; ``ValueError`` naming the field if one is bad."""
        return replace(self, **Faults.checked(changes))

    @staticmethod
    def checked(changes: Mapping[str, Any], *, none_allowed: bool = False) -> dict[str, Any]:
        """``changes`` validated and normalised; ``ValueError`` naming the field if one is bad.
        With ``none_allowed`` a None stays None (an account's field back to the global one)."""
        if not isinstance(changes, Mapping):
            raise ValueError("faults must be a JSON object")
        known = {f for f in Faults.__dataclass_fields__}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return {name: None if value is None and none_allowed else _CHECKS[name](name, value)
                for name, value in changes.items()}


def _number(name: str, value: Any, *, low: float = 0.0, high: float | None = None,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be {bound}{upper}")
    return value


def _rate(name: str, value: Any) -> float:
    return float(_number(name, value, high=1.0))


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def _non_negative(name: str, value: Any) -> float:
    return _number(name, value)


def _positive(name: str, value: Any) -> float:
    return _number(name, value, low_open=True)


def _limit_rps(name: str, value: Any) -> float:
    # The limit's window holds up to R arrival times per account; past a million a second
    # no client on this machine could tell, and the window's memory would be the only effect.
    return _number(name, value, high=MAX_LIMIT_RPS)


def _retry_after(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number of seconds >= 0")
    return value


def _error_rates(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object of status -> probability")
    rates = {}
    for status, rate in value.items():
        if str(status) not in FAULT_STATUSES:
            raise ValueError(f"{name}: status {status!r} is not one of {', '.join(FAULT_STATUSES)}")
        rates[str(status)] = _rate(f"{name}[{status}]", rate)
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"{name}: probabilities add up to more than 1")
    return {s: r for s, r in rates.items() if r > 0}


def _link_errors(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object of payment link id -> status")
    for link_id, status in value.items():
        if not isinstance(link_id, str) or not link_id:
            raise ValueError(f"{name}: keys must be payment link ids")
        if str(status) not in FAULT_STATUSES:
            raise ValueError(f"{name}[{link_id}]: status {status!r} is not one of {', '.join(FAULT_STATUSES)}")
    return {link_id: str(status) for link_id, status in value.items()}


_CHECKS = {
    "latency_ms": _non_negative, "error_rates": _error_rates, "retry_after": _retry_after,
    "outage": _flag, "reset_rate": _rate, "timeout_rate": _rate, "hang_ms": _non_negative,
    "token_ttl": _positive, "reject_tokens": _flag, "faults_skip_token": _flag,
    "link_errors": _link_errors, "limit_rps": _limit_rps, "throttle_rate": _rate,
    "plural_throttle_rate": _rate,
}


@dataclass(frozen=True)
class Decision:
    """What the faults make of one request, decided when it arrives."""

    delay: float = 0.0
    """Seconds to wait before answering (latency plus any hang)."""
    reset: bool = False
    """Close with a TCP RST instead of answering."""
    status: int | None = None
    """An injected status to answer instead of the real one (outage, error_rates, a throttle)."""
    hang: bool = False
    """The answer is held ``hang_ms`` (a timeout fault)."""
    throttle: str | None = None
    """Which throttle answered: ``limit`` (``limit_rps``), ``throttle`` (``throttle_rate``) or
    ``plural_throttle`` (``plural_throttle_rate``)."""
    retry_after: int | None = None
    """Seconds for ``Retry-After`` when not the faults' ``retry_after`` (the limit's own wait)."""

    @property
    def label(self) -> str | None:
        """A short name for the request log: ``reset``, ``503``, ``limit``, ``timeout``..."""
        if self.reset:
            return "reset"
        if self.throttle is not None:
            return self.throttle
        if self.status is not None:
            return str(self.status)
        if self.hang:
            return "timeout"
        return None


NO_FAULT = Decision()


class FaultInjector:
    """Holds the current :class:`Faults`, global and per account, and rolls the dice for each
    request."""

    def __init__(self, faults: Faults | Mapping[str, Any] | None = None, *,
                 rng: random.Random | None = None):
        self._lock = threading.Lock()
        base = faults if isinstance(faults, Faults) else Faults().updated(faults or {})
        self._faults = self._initial = base
        self._overrides: dict[str, dict[str, Any]] = {}
        """Client id -> the fields that account sets for itself."""
        self._by_account: dict[str, Faults] = {}
        """Client id -> its faults in force (the global ones with its overrides), rebuilt as a
        whole on every change so a request reads one consistent set without the lock."""
        self._limit = AccountLimit()
        self.rng = rng or random.Random()

    @property
    def current(self) -> Faults:
        """The global faults (those of every account without its own)."""
        return self._faults

    def for_account(self, account: str | None) -> Faults:
        """The faults in force for ``account``'s calls (None: a call of no known account)."""
        if account is None:
            return self._faults
        return self._by_account.get(account, self._faults)

    def overrides(self) -> dict[str, dict[str, Any]]:
        """Client id -> the faults that account sets for itself."""
        return {account: dict(fields) for account, fields in self._overrides.items()}

    def update(self, changes: Mapping[str, Any], *, account: str | None = None) -> Faults:
        """Apply a partial update and return the faults in force for ``account`` (the global
        ones with None); ``ValueError`` (and no change) if bad.

        Without ``account`` the change is global: it reaches every account, except in the
        fields an account overrides. With one it is that account's own; a field set to
        None there follows the global one again.
        """
        with self._lock:
            if account is None:
                self._faults = self._faults.updated(changes)
            else:
                own = {**self._overrides.get(account, {}),
                       **Faults.checked(changes, none_allowed=True)}
                own = {name: value for name, value in own.items() if value is not None}
                others = {a: o for a, o in self._overrides.items() if a != account}
                self._overrides = {**others, account: own} if own else others
            self._rebuild()
            return self.for_account(account)

    def reset(self, *, account: str | None = None) -> Faults:
        """Back to the faults the sandbox started with, no account's own faults, no cancel
        counted against a limit; with ``account``, only that account's own faults and count."""
        with self._lock:
            if account is None:
                self._faults = self._initial
                self._overrides = {}
            else:
                self._overrides = {a: o for a, o in self._overrides.items() if a != account}
            self._limit.clear(account)
            self._rebuild()
            return self.for_account(account)

    def _rebuild(self) -> None:
        self._by_account = {account: replace(self._faults, **own)
                            for account, own in self._overrides.items()}

    def decide(self, f: Faults, *, now: float, token_call: bool, link_id: str | None = None,
               cancel: bool = False, account: str | None = None) -> Decision:
        """Roll for one /api request arriving at ``now`` (the sandbox clock's seconds, as the
        request log records it: what ``limit_rps`` counts) under ``f`` (:meth:`for_account`'s
        faults for ``account``, the client id the call is made for; ``link_id``: the payment
        link its path names; ``cancel``: a cancel PUT, the only call the throttles answer).

        Rolls happen only for rates above zero, in a fixed order (throttle, Plural's
        throttle, reset, error, timeout), so a seeded run repeats itself; the limit counts
        the cancels no random throttle refused."""
        if token_call and f.faults_skip_token:
            return NO_FAULT
        if link_id is not None and link_id in f.link_errors:
            return Decision(delay=f.latency_ms / 1000.0, status=int(f.link_errors[link_id]))
        throttles = cancel and (f.limit_rps or f.throttle_rate or f.plural_throttle_rate)
        if not (throttles or f.latency_ms or f.outage or f.reset_rate or f.error_rates
                or f.timeout_rate):
            return NO_FAULT
        delay = f.latency_ms / 1000.0
        with self._lock:
            rng = self.rng
            if f.outage:
                return Decision(delay=delay, status=503)
            if throttles:
                if f.throttle_rate and rng.random() < f.throttle_rate:
                    return Decision(delay=delay, status=429, throttle="throttle")
                if f.plural_throttle_rate and rng.random() < f.plural_throttle_rate:
                    return Decision(delay=delay, status=400, throttle="plural_throttle")
                # A call with no valid token has no account to count against: it gets its 401.
                if f.limit_rps and account is not None:
                    wait = self._limit.admit(account, f.limit_rps, now)
                    if wait:
                        return Decision(delay=delay, status=429, throttle="limit",
                                        retry_after=max(1, math.ceil(wait)))
            if f.reset_rate and rng.random() < f.reset_rate:
                return Decision(delay=delay, reset=True)
            if f.error_rates:
                roll = rng.random()
                for status, rate in f.error_rates.items():
                    if roll < rate:
                        return Decision(delay=delay, status=int(status))
                    roll -= rate
            hang = bool(f.timeout_rate) and rng.random() < f.timeout_rate
        if hang:
            delay += f.hang_ms / 1000.0
        return Decision(delay=delay, hang=hang)
