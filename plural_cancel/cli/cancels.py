"""Commands about single cancels: ``enqueue``, ``status``, and the local ``sandbox``.

``sandbox`` is the sandbox's own command (``sandbox.cli``), the one ``python -m sandbox``
runs: this group only gives it a second name.
"""

from __future__ import annotations

import json

import click

from plural_cancel.cli.base import Failure, UsageFailure, account_option, configured_app
from plural_cancel.sandbox.cli import sandbox


@click.command()
@click.argument("payment_link_id")
@click.option("--request-id", help="Idempotency key (1-50 of A-Za-z0-9._:-); a new UUID4 when absent.")
@account_option("The Plural account whose link it is: a name of PLURAL_ACCOUNTS_FILE that the workers "
                "know [default: the default account]. An unknown one: exit 2, nothing enqueued.")
def enqueue(payment_link_id: str, request_id: str | None, account: str | None):
    """Enqueue a cancel of PAYMENT_LINK_ID; prints its Request-ID."""
    from plural_cancel.tasks.producer import enqueue_cancel

    app = configured_app()
    try:
        click.echo(enqueue_cancel(payment_link_id, request_id, account=account, app=app))
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None


@click.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole status record as JSON.")
def status(request_id: str, as_json: bool):
    """Show the status of the cancel with REQUEST_ID: its state, outcome, attempts, the Plural
    account it is for (``default`` unless it named one) and the rest of its record.
    """
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


COMMANDS = [enqueue, status, sandbox]
