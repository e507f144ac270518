"""Plural accounts: ``default`` from ``PLURAL_CLIENT_ID`` / ``PLURAL_CLIENT_SECRET``, and the
TOML file ``PLURAL_ACCOUNTS_FILE`` names, one ``[accounts.NAME]`` table per account.

:func:`read_accounts` reads them once (start-up: a bad file stops it, in one line naming the
file, the account and the field); :class:`AccountBook` keeps them for a running process and
re-reads the file as it changes, keeping the last good accounts when a change is bad.

Like the settings, this module may read the environment: a ``client_secret_env`` names the
variable that holds an account's secret. No message, ``repr`` or log line ever holds a secret
or a client id.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from plural_cancel.config.settings import (
    _CONTROL,
    PLURAL_BASES,
    REFERENCE,
    Secret,
    Settings,
    _mask_url_password,
    _plural_base_url,
    _proxy_for,
)
from plural_cancel.errors import ConfigError

log = logging.getLogger(__name__)

VARIABLE = "PLURAL_ACCOUNTS_FILE"

DEFAULT = "default"
"""The account of ``PLURAL_CLIENT_ID`` / ``PLURAL_CLIENT_SECRET``."""

ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_-]{1,50}")
"""An account's name: 1-50 of ``A-Za-z0-9_-`` (it goes into Redis keys, metrics and log lines)."""

RELOAD_INTERVAL = 10.0
"""Seconds between two looks (one ``os.stat``) at the file by :meth:`AccountBook.refresh`."""

UNKNOWN_LOOK_INTERVAL = 1.0
"""Seconds: an unknown name makes :meth:`AccountBook.get` look at the file at once, but no more
often than this, so a flood of unknown names costs one look a second."""

RACY_SECONDS = 2.0
"""Seconds: a file modified this recently when read may change again within its timestamp's
granularity (a jiffy on Linux, 2 s on FAT) without its size or mtime showing it; it is read
again at the next look rather than trusted (git's "racy clean" rule)."""

MAX_FILE_BYTES = 1 << 20
"""Bytes: the largest accounts file read (a wrong path to a large file is refused, not parsed)."""

MAX_CLIENT_ID = 200
"""Characters: the longest ``client_id`` accepted."""

SHOWN_NAME = 60
"""Characters of a refused account or field name repeated in the error."""

FIELDS = ("client_id", "client_secret", "client_secret_env", "rate_limit", "env", "base_url")
"""The fields an ``[accounts.NAME]`` table may hold."""

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
"""What ``client_secret_env`` accepts: an environment variable's name."""

_RATE_LIMIT = next(variable for variable in REFERENCE if variable.name == "PLURAL_RATE_LIMIT")


class AccountsError(ConfigError):
    """The accounts file is missing, unreadable or holds a bad value: one line naming the file,
    the account and the field, ``PLURAL_ACCOUNTS_FILE (/path): account 'shop-a': rate_limit:
    must be ... (got ...)``; never a secret's value nor a client id."""

    def __init__(self, path: str, accepts: str, got: str | None = None, *, account: str | None = None,
                 field: str | None = None):
        where = f"{VARIABLE} ({path})"
        if account is not None:
            where += f": account {_shown(account)}"
        if field is not None:
            where += f": {field}"
        super().__init__(where, accepts, got)
        self.variable = VARIABLE
        self.path = path
        self.account = account
        self.field = field


def _shown(name: str) -> str:
    """A name from the file as an error repeats it: quoted, escaped, cut to :data:`SHOWN_NAME`."""
    return repr(name if len(name) <= SHOWN_NAME else name[:SHOWN_NAME - 3] + "...")


@dataclass(frozen=True)
class Account:
    """One Plural merchant account: its credentials, its rate limit and where its Plural is.

    Equality compares every field, the secret too: a changed secret is a changed account."""

    name: str
    client_id: str
    client_secret: Secret
    rate_limit: float
    """Calls per second to Plural for this account, across every worker process and host."""
    plural_env: str
    """``uat`` or ``prod``."""
    base_url: str
    """Plural's API base: the account's ``base_url``, else its ``env``'s, else the settings'."""
    proxy: str | None
    """The proxy the environment names for ``base_url`` (``HTTPS_PROXY``, ``NO_PROXY``...), or None."""

    def settings(self, base: Settings) -> Settings:
        """``base`` with this account's credentials, rate limit, environment, base URL and proxy."""
        return replace(base, client_id=self.client_id, client_secret=self.client_secret, rate_limit=self.rate_limit,
                       plural_env=self.plural_env, plural_base_url=self.base_url, plural_proxy=self.proxy)

    def __repr__(self) -> str:
        # The dataclass's own would show the proxy's password (the secret masks itself).
        proxy = _mask_url_password(self.proxy) if self.proxy else None
        return (f"Account(name={self.name!r}, client_id={self.client_id!r}, client_secret={self.client_secret!r}, "
                f"rate_limit={self.rate_limit!r}, plural_env={self.plural_env!r}, base_url={self.base_url!r}, "
                f"proxy={proxy!r})")


def read_accounts(settings: Settings, environ: Mapping[str, str]) -> dict[str, Account]:
    """Every account in force, by name: the file's (``settings.accounts_file``, when set) and
    ``default`` from ``PLURAL_CLIENT_ID`` / ``PLURAL_CLIENT_SECRET`` when the id is set (with
    the settings' rate limit, environment, base URL and proxy).

    ``environ`` holds the variables ``client_secret_env`` names and the proxy variables.
    Raises :class:`AccountsError` (or :class:`ConfigError` for a bad variable) on anything bad.
    No file and no ``PLURAL_CLIENT_ID``: ``{}`` (a producer host)."""
    accounts, _ = _read(settings, environ)
    return accounts


def _read(settings: Settings, environ: Mapping[str, str]) -> tuple[dict[str, Account], tuple | None]:
    """:func:`read_accounts`, and the file's :func:`_signature` as it was read (None: no file)."""
    accounts = {}
    if settings.client_id:
        settings.require_credentials()
        accounts[DEFAULT] = Account(DEFAULT, settings.client_id, settings.client_secret, settings.rate_limit,
                                    settings.plural_env, settings.plural_base_url, settings.plural_proxy)
    path = settings.accounts_file
    if path is None:
        return accounts, None
    document, signature = _load(path)
    tables = document.get("accounts", {})
    if set(document) - {"accounts"}:
        raise AccountsError(path, "a file of [accounts.NAME] tables only, nothing else at its top level",
                            min(set(document) - {"accounts"})[:SHOWN_NAME])
    if not isinstance(tables, dict):
        raise AccountsError(path, "a file of [accounts.NAME] tables: 'accounts' is not a table")
    if not tables and not accounts:
        raise AccountsError(path, "a file of one [accounts.NAME] table per account (it has no accounts, "
                            "and PLURAL_CLIENT_ID is unset)")
    for name, table in tables.items():
        if not ACCOUNT_NAME.fullmatch(name):
            raise AccountsError(path, "an account named with 1-50 characters of A-Z a-z 0-9 _ -", account=name)
        if not isinstance(table, dict):
            raise AccountsError(path, f"a table, [accounts.{name}], of the account's fields", account=name)
        if name == DEFAULT and DEFAULT in accounts:
            raise AccountsError(path, "defined once: in this file or by PLURAL_CLIENT_ID, not both (remove "
                                "[accounts.default] or unset PLURAL_CLIENT_ID)", account=name)
    # Before any field is judged: a secret others can read is refused whatever else is wrong.
    inline = next((name for name, table in tables.items() if "client_secret" in table), None)
    if inline is not None:
        _private(path, signature, inline)
    get = _getter(environ)
    for name, table in tables.items():
        accounts[name] = _account(path, name, table, settings, get)
    _distinct(path, accounts)
    return accounts, signature


def _load(path: str) -> tuple[dict[str, Any], tuple]:
    """The file parsed, and its :func:`_signature` from the open file (so both are of one file)."""
    try:
        # O_NONBLOCK: a path to a FIFO must not hang start-up (or a reload) waiting for a writer.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise AccountsError(path, "a regular file of [accounts.NAME] tables")
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AccountsError(path, f"a readable file of [accounts.NAME] tables ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise AccountsError(path, f"a file of at most {MAX_FILE_BYTES} bytes")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AccountsError(path, f"UTF-8 text (byte {exc.start} is not)") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message says where ("... (at line 3, column 9)") and never repeats the value.
        raise AccountsError(path, f"valid TOML: {exc}") from None
    return document, _signature(status)


def _signature(status: os.stat_result) -> tuple:
    """What tells one version of the file from another without reading it. The mode is in it so
    that a ``chmod 600`` mends a file refused for its permissions without another edit."""
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_mode)


def _private(path: str, signature: tuple, account: str) -> None:
    """Refuse a file that holds a client_secret and that its group or others may read."""
    mode = signature[-1]
    if mode & 0o044:
        raise AccountsError(path, f"in a file only its owner may read (chmod 600 {path}; it is "
                            f"{stat.S_IMODE(mode):03o}), or read from a variable with client_secret_env",
                            account=account, field="client_secret")


def _distinct(path: str, accounts: dict[str, Account]) -> None:
    """Refuse two accounts with one client id on one Plural: their tokens and limits would mix."""
    seen: dict[tuple[str, str], str] = {}
    for name, account in accounts.items():
        other = seen.setdefault((account.client_id, account.base_url), name)
        if other != name:
            raise AccountsError(path, f"a client id no other account uses on the same Plural (account "
                                f"{_shown(other)} has this one at {account.base_url})", account=name,
                                field="client_id")


def _getter(environ: Mapping[str, str]) -> Callable[[str], str | None]:
    """A variable's value as :meth:`Settings.from_env` reads it: stripped, blank as unset."""

    def get(name: str) -> str | None:
        value = environ.get(name)
        if value is None or value.strip() == "":
            return None
        if _CONTROL.search(value.strip()):
            raise ConfigError(name, "a value without control characters (newline, tab, NUL...)")
        return value.strip()

    return get


def _account(path: str, name: str, table: dict[str, Any], settings: Settings, get) -> Account:
    """One ``[accounts.NAME]`` table as an :class:`Account`, each field checked."""

    def refuse(field: str, accepts: str, got: str | None = None):
        return AccountsError(path, accepts, got, account=name, field=field)

    def text(field: str, *, repeat: bool = False) -> str | None:
        """A string field, stripped; None when absent. Repeated in the error only when ``repeat``."""
        value = table.get(field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise refuse(field, "a string in quotes", _toml_type(value) if repeat else None)
        value = value.strip()
        if not value:
            raise refuse(field, "a non-empty string")
        if _CONTROL.search(value):
            raise refuse(field, "a string without control characters (newline, tab, NUL...)")
        return value

    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        # Quoted when it is not a plain name: a TOML key may hold a newline, and the line must stay one.
        field = unknown[0] if ACCOUNT_NAME.fullmatch(unknown[0]) else _shown(unknown[0])
        raise refuse(field, f"one of the fields {', '.join(FIELDS)} (a misspelt one is refused, not ignored)")

    client_id = text("client_id")
    if client_id is None:
        raise refuse("client_id", "set to the account's client id from Plural's dashboard")
    if len(client_id) > MAX_CLIENT_ID:
        raise refuse("client_id", f"at most {MAX_CLIENT_ID} characters")

    if "client_secret" in table and "client_secret_env" in table:
        raise refuse("client_secret_env", "unset when client_secret is set: the secret comes from one of them")
    variable = text("client_secret_env", repeat=True)
    if variable is not None:
        if not ENV_NAME.fullmatch(variable):
            raise refuse("client_secret_env", "an environment variable's name (1-100 of A-Z a-z 0-9 _, "
                         "not starting with a digit)", variable[:SHOWN_NAME])
        secret = get(variable)
        if secret is None:
            # The variable's name, never its value.
            raise refuse("client_secret_env", f"the name of a variable set in the workers' environment "
                         f"({variable} is unset or empty)")
    else:
        secret = text("client_secret")
        if secret is None:
            raise refuse("client_secret", "set, or client_secret_env set to the name of the variable holding it")

    rate_limit = table.get("rate_limit", settings.rate_limit)
    if isinstance(rate_limit, bool) or not isinstance(rate_limit, (int, float)):
        raise refuse("rate_limit", f"{_RATE_LIMIT.accepted()}, a TOML number", _toml_type(rate_limit))
    if rate_limit not in _RATE_LIMIT.range:  # NaN too: it compares false with both bounds
        raise refuse("rate_limit", _RATE_LIMIT.accepted(), str(rate_limit))

    plural_env = text("env", repeat=True)
    if plural_env is None:
        plural_env = settings.plural_env
    elif plural_env.lower() not in PLURAL_BASES:
        raise refuse("env", "one of uat, prod", plural_env[:SHOWN_NAME])
    plural_env = plural_env.lower()

    base_url = text("base_url")
    if base_url is not None:
        try:
            base_url = _plural_base_url(base_url)
        except ConfigError as exc:
            # The same rules as PLURAL_BASE_URL, said of this account's field: the settings'
            # line is "PLURAL_BASE_URL: must be ...", whose value it repeats only without credentials.
            raise refuse("base_url", str(exc).removeprefix("PLURAL_BASE_URL: must be ")) from None
    elif "env" in table:
        base_url = PLURAL_BASES[plural_env]
    else:
        base_url = settings.plural_base_url

    proxy = settings.plural_proxy if base_url == settings.plural_base_url else _proxy_for(base_url, get)
    return Account(name, client_id, Secret(secret), float(rate_limit), plural_env, base_url, proxy)


def _toml_type(value: Any) -> str:
    """What a refused value is, in TOML's words, where the value itself is not repeated."""
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", dict: "a table", list: "an array"}
    return kinds.get(type(value), "a date or time")


_MISSING = ("missing",)
"""The :func:`_signature` of a file that cannot be stat'ed (removed): read, and refused, once."""


def _trusted(signature: tuple | None) -> tuple | None:
    """``signature``, or None when the file was modified too recently to trust it (:data:`RACY_SECONDS`)."""
    if signature is None or signature == _MISSING:
        return signature
    # File times are wall-clock times: this compares them with the wall clock, not the book's clock.
    racy = time.time_ns() - signature[3] < RACY_SECONDS * 1e9
    return None if racy else signature


class AccountBook:
    """The accounts in force in one process, re-read from the file as it changes.

    Safe to share between threads: a lookup reads one dict, a re-read replaces it whole."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, reload_interval: float = RELOAD_INTERVAL,
                 on_reload_failure: Callable[[Exception], None] | None = None):
        """Reads the accounts once: a bad file or setting raises here, and start-up stops.

        ``environ``: where ``client_secret_env`` and the proxy variables are read, at every
        re-read; None: ``os.environ``. ``clock``: seconds, monotonic. ``reload_interval``:
        seconds between two looks at the file. ``on_reload_failure``: called with the error
        of each re-read that failed (a metric's counter), after it is logged."""
        self._settings = settings
        self._environ = environ
        self._clock = clock
        self._reload_interval = reload_interval
        self._on_reload_failure = on_reload_failure
        self._lock = threading.Lock()
        self._accounts, signature = _read(settings, self._env())
        self._signature = _trusted(signature)
        self._failed: tuple | None = None
        """The signature and line of the last failed re-read, until one succeeds."""
        self._last_look = clock()
        self._last_unknown_look = float("-inf")
        self.generation = 0
        """Starts at 0; +1 each time an account is added, removed or changed."""
        self.failures = 0
        """Re-reads that failed since start, one for each bad version of the file (each logged;
        the last good accounts stayed in force)."""

    def get(self, name: str) -> Account | None:
        """The account named ``name``, or None. An unknown name makes it look at the file at once
        (re-reading it if it changed), at most once a second (:data:`UNKNOWN_LOOK_INTERVAL`)."""
        account = self._accounts.get(name)
        if account is None and self._settings.accounts_file is not None:
            now = self._clock()
            if now - self._last_unknown_look >= UNKNOWN_LOOK_INTERVAL:
                self._last_unknown_look = now
                self._look(now, force=False)
                account = self._accounts.get(name)
        return account

    def names(self) -> tuple[str, ...]:
        """Every account's name, sorted."""
        return tuple(sorted(self._accounts))

    def accounts(self) -> dict[str, Account]:
        """Every account, by name: a copy."""
        return dict(self._accounts)

    def refresh(self, *, force: bool = False) -> bool:
        """Look at the file when ``reload_interval`` seconds have passed since the last look, and
        re-read it when it changed (its ``os.stat``: device, inode, size, mtime, mode); with
        ``force``, re-read it now whatever its stat says. True when the accounts changed.

        A bad file (unreadable, removed, a syntax error, a bad field, group- or world-readable
        with a secret in it) leaves the last good accounts in force: one error line is logged,
        ``failures`` counted, ``on_reload_failure`` called, once for each bad version of the
        file. It is read again when it changes again (a fix, or a ``chmod``), or on ``force``."""
        if self._settings.accounts_file is None:
            return False
        now = self._clock()
        if not force and now - self._last_look < self._reload_interval:
            return False
        return self._look(now, force=force)

    def _look(self, now: float, *, force: bool) -> bool:
        path = self._settings.accounts_file
        with self._lock:
            self._last_look = now
            try:
                current = _signature(os.stat(path))
            except OSError:
                current = _MISSING
            if not force and current == self._signature:
                return False
            try:
                accounts, signature = _read(self._settings, self._env())
            except Exception as exc:  # whatever it is, the last good accounts stay in force
                # Only a ConfigError's line is known to hold no secret.
                line = str(exc) if isinstance(exc, ConfigError) else f"{VARIABLE} ({path}): {type(exc).__name__}"
                # The failed version is remembered: it is not read again until it changes, and
                # when it is (its stat too recent to trust, or force) and fails alike, not counted again.
                self._signature = _trusted(current)
                if self._failed == (current, line):
                    return False
                self._failed = (current, line)
                self.failures += 1
                failure = exc
            else:
                self._signature = _trusted(signature)
                self._failed = None
                changed = accounts != self._accounts
                if changed:
                    self._accounts = accounts
                    self.generation += 1
                return changed
        log.error("accounts file not reloaded, the last good accounts stay in force: %s", line)
        if self._on_reload_failure is not None:
            self._on_reload_failure(failure)
        return False

    def _env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ
