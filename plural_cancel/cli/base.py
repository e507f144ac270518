"""What every ``plural-cancel`` command shares: its errors (with their exit statuses), settings,
and the one place where a Redis that is away or refuses writes becomes one line on stderr."""

from __future__ import annotations

import importlib
import sys
from typing import Mapping

import click

from plural_cancel.config.settings import Settings
from plural_cancel.errors import ConfigError, PluralCancelError

_SETTINGS = "plural_cancel.settings"
"""Where :func:`load_settings` leaves the settings in the click context, for the error line."""


class UsageFailure(PluralCancelError, click.ClickException):
    """Bad input: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"plural-cancel: {self.format_message()}", err=True)


class Failure(PluralCancelError, click.ClickException):
    """Anything else that went wrong: one line on stderr, exit status 1."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"plural-cancel: {self.format_message()}", err=True)


class Commands(click.Group):
    """The ``plural-cancel`` group: a Redis error from any command (subgroups too) ends it with
    one line naming what failed and exit status 1, never a traceback.

    A command adds what the operator needs to know about work done before the error with
    ``exc.add_note(...)`` and re-raises; the note is put in brackets at the end of the line.

    ``lazy`` maps a command's name to the module of this package that holds it (in its
    ``COMMANDS``), loaded when a command of it is asked for: most commands need Celery, and
    ``health``, run by every container's healthcheck, does not (click's documented
    lazy-loading pattern).
    """

    def __init__(self, *args, lazy: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            module = importlib.import_module(f"{__package__}.{self.lazy[name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not _from_redis(exc):
                raise
            raise Failure(describe_redis_error(exc, ctx.meta.get(_SETTINGS))) from None


def _from_redis(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's, or kombu's wrapping of one (when publishing). Neither
    library is loaded for it: a command that never loaded one cannot have its error."""
    redis, kombu = sys.modules.get("redis"), sys.modules.get("kombu.exceptions")
    errors = (*((redis.RedisError,) if redis else ()), *((kombu.OperationalError,) if kombu else ()))
    return isinstance(exc, errors)


def describe_redis_error(exc: BaseException, settings: Settings | None) -> str:
    """One line saying what Redis did: not reachable, refused the write (OOM, READONLY),
    refused the credentials, or another error; naming ``REDIS_URL``'s server (its password
    masked), or under Sentinel the master and ``REDIS_SENTINELS`` (``REDIS_URL``'s host is not used then)."""
    import redis
    from kombu.exceptions import OperationalError

    notes = "; ".join(getattr(exc, "__notes__", ()))
    if isinstance(exc, OperationalError) and isinstance(exc.__context__, redis.RedisError):
        exc = exc.__context__
    if settings is None:
        where = "Redis"
    elif settings.redis_sentinels:
        where = f"the Redis master {settings.redis_sentinel_master!r} of REDIS_SENTINELS"
    else:
        where = f"Redis at {settings.describe()['redis_url']}"
    text = str(exc)
    if settings is not None and settings.redis_sentinels and isinstance(exc, redis.sentinel.MasterNotFoundError):
        line = f"cannot reach Redis: {master_not_found(exc, settings)}"
    elif isinstance(exc, (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError)) \
            or text.startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
        line = f"{where} refused the credentials: {text}"
    elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and not isinstance(exc, redis.BusyLoadingError):
        line = f"cannot reach {where}: {_reason(exc)}"
    elif isinstance(exc, (redis.ReadOnlyError, redis.OutOfMemoryError)) \
            or "command not allowed when used memory" in text or "read only replica" in text:
        # A pipeline's error names its command and arguments first; the reason is what matters.
        reason = text.split(" caused error: ", 1)[-1]
        if isinstance(exc, redis.OutOfMemoryError) and not reason.startswith("OOM"):
            reason = f"OOM {reason}"
        line = f"{where} refused the write: {reason}"
    else:
        line = f"{where} failed: {type(exc).__name__}: {text}"
    return f"{line} ({notes})" if notes else line


def master_not_found(exc: BaseException, settings: Settings) -> str:
    """What redis-py's ``MasterNotFoundError`` means under ``settings``' Sentinels, in one short line."""
    from plural_cancel.config.sentinel import master_not_found

    return master_not_found(exc, settings.redis_sentinel_master, settings.redis_sentinels)


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed connection ("Connection refused"), else redis-py's."""
    import redis

    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, TimeoutError):
            return "timed out"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, redis.TimeoutError):
        return "timed out"
    return str(exc).rstrip(".") or type(exc).__name__


def load_settings() -> Settings:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise UsageFailure(f"configuration error: {exc}") from None
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_SETTINGS] = settings
    return settings


ACCOUNT_HELP = ("The Plural account: a name of PLURAL_ACCOUNTS_FILE that the workers know "
                "[default: the default account].")
"""The help of ``--account`` where it names the account a command works for."""


def account_option(help_text: str = ACCOUNT_HELP):
    """``--account NAME``: None when not given (the producer API takes that as the default account)."""
    return click.option("--account", metavar="NAME", help=help_text)


def known_account(app, account: str | None) -> str:
    """``account``'s name (None: the default account) when the workers know it (published in
    Redis, or in this host's own accounts file); else :class:`UsageFailure` naming
    ``account``, before anything is read or written."""
    from plural_cancel.worker.accounts import check_account

    try:
        return check_account(app.runtime, account)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None


def configured_app():
    """An app built from the command line's settings (its options over the environment),
    closed (its Redis connections and broker pool) when the command ends."""
    from plural_cancel.worker import create_app

    app = create_app(load_settings())
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(app.close)
    return app
