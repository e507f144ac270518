"""Commands about single cancels: ``enqueue``, ``status``, and the local ``sandbox``."""

from __future__ import annotations

import json

import click

from plural_cancel.tasks.cli.base import Failure, UsageFailure, configured_app, load_settings


@click.command()
@click.argument("payment_link_id")
@click.option("--request-id", help="Idempotency key (1-50 of A-Za-z0-9._:-); a new UUID4 when absent.")
def enqueue(payment_link_id: str, request_id: str | None):
    """Enqueue a cancel of PAYMENT_LINK_ID; prints its Request-ID."""
    from plural_cancel.tasks.producer import enqueue_cancel

    app = configured_app()
    try:
        click.echo(enqueue_cancel(payment_link_id, request_id, app=app))
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None


@click.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole status record as JSON.")
def status(request_id: str, as_json: bool):
    """Show the status of the cancel with REQUEST_ID."""
    from plural_cancel.tasks.producer import get_status

    app = configured_app()
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


@click.command()
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
    from plural_cancel.sandbox.server import serve

    settings = load_settings()
    client_id = client_id or settings.client_id
    client_secret = client_secret or (settings.client_secret.reveal() if settings.client_secret else None)
    faults = {"latency_ms": latency_ms, "outage": outage, "reset_rate": reset_rate,
              "timeout_rate": timeout_rate, "token_ttl": token_ttl}
    if error_rate:
        faults["error_rates"] = {"500": error_rate}
    serve(host, port, client_id=client_id, client_secret=client_secret, faults=faults, token_style=token_style)


COMMANDS = [enqueue, status, sandbox]
