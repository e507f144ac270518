"""``plural-cancel``: the operator's command line. Thin: it parses, calls the API, prints.

Exit status: 0 on success, 2 on bad input (one line on stderr), 1 otherwise.
"""

from __future__ import annotations

import json
import sys

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


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise UsageFailure(f"configuration error: {exc}") from None


def _app():
    from worker import app

    app.use(_settings())
    return app


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Cancel Pine Labs Plural payment links through the background worker."""


@cli.command()
@click.argument("payment_link_id")
@click.option("--request-id", help="Idempotency key (1-50 of A-Za-z0-9._:-); a new UUID4 when absent.")
def enqueue(payment_link_id: str, request_id: str | None):
    """Enqueue a cancel of PAYMENT_LINK_ID; prints its Request-ID."""
    from tasks.producer import enqueue_cancel

    app = _app()
    try:
        click.echo(enqueue_cancel(payment_link_id, request_id, app=app))
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None


@cli.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole status record as JSON.")
def status(request_id: str, as_json: bool):
    """Show the status of the cancel with REQUEST_ID."""
    from tasks.producer import get_status

    app = _app()
    try:
        record = get_status(request_id, app=app)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    if record is None:
        raise Failure(f"no cancel with request_id {request_id!r} (unknown, or expired after RESULT_TTL)")
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        click.echo(f"{key:16} {'' if value is None else value}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8800, show_default=True, type=click.IntRange(0, 65535))
@click.option("--latency-ms", default=0.0, type=click.FloatRange(min=0), help="Added before every answer.")
@click.option("--error-rate", default=0.0, type=click.FloatRange(0, 1), help="Share of calls answered 500.")
@click.option("--outage", is_flag=True, help="Answer every call 503.")
@click.option("--reset-rate", default=0.0, type=click.FloatRange(0, 1), help="Share of connections reset.")
@click.option("--timeout-rate", default=0.0, type=click.FloatRange(0, 1), help="Share of calls left hanging.")
@click.option("--token-ttl", default=3600.0, type=click.FloatRange(min=1), help="Seconds a token lives.")
@click.option("--token-style", default="expires_at", type=click.Choice(["expires_at", "expires_in"]))
@click.option("--client-id", default=None, help="Accepted client id (default PLURAL_CLIENT_ID; any when unset).")
@click.option("--client-secret", default=None, help="Accepted secret (default PLURAL_CLIENT_SECRET).")
def sandbox(host, port, latency_ms, error_rate, outage, reset_rate, timeout_rate, token_ttl, token_style,
            client_id, client_secret):
    """Run the local Plural sandbox (Plural's paths under http://HOST:PORT/api)."""
    from sandbox.server import serve

    settings = _settings()
    client_id = client_id or settings.client_id
    client_secret = client_secret or (settings.client_secret.reveal() if settings.client_secret else None)
    faults = {"latency_ms": latency_ms, "outage": outage, "reset_rate": reset_rate,
              "timeout_rate": timeout_rate, "token_ttl": token_ttl}
    if error_rate:
        faults["error_rates"] = {"500": error_rate}
    serve(host, port, client_id=client_id, client_secret=client_secret, faults=faults, token_style=token_style)


@cli.command()
def check():
    """Check the settings, that Redis answers and that a Plural token can be had."""
    import redis

    from worker.runtime import Runtime

    settings = _settings()
    try:
        settings.require_credentials()
    except ConfigError as exc:
        raise UsageFailure(f"configuration error: {exc}") from None
    click.echo("settings   ok")
    runtime = Runtime(settings)
    try:
        runtime.redis.ping()
    except redis.RedisError as exc:
        raise Failure(f"redis      unreachable: {type(exc).__name__}") from None
    click.echo("redis      ok")
    try:
        runtime.plural.generate_token()
    except Exception as exc:  # every Plural error is reported the same way here: one line
        raise Failure(f"plural     no token: {exc}") from None
    finally:
        runtime.close()
    click.echo("plural     ok (token obtained)")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="plural-cancel", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.UsageError as exc:
        click.echo(f"plural-cancel: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
