"""What every ``plural-cancel`` command shares: its errors (with their exit statuses) and settings."""

from __future__ import annotations

import click

from config.settings import ConfigError, Settings


class UsageFailure(click.ClickException):
    """Bad input: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"plural-cancel: {self.format_message()}", err=True)


class Failure(click.ClickException):
    """Anything else that went wrong: one line on stderr, exit status 1."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"plural-cancel: {self.format_message()}", err=True)


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise UsageFailure(f"configuration error: {exc}") from None


def configured_app():
    from worker import app

    app.use(load_settings())
    return app
