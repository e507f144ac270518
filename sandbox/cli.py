"""The sandbox's command line: one click command, two names.

``python -m sandbox`` (tests, benchmarks) runs :func:`main`, and ``plural-cancel
sandbox`` (``make run``, docker-compose) is this same :func:`sandbox` command added to
the ``plural-cancel`` group by ``plural_cancel.cli``: one set of options, one set of defaults.

Credentials: ``--client-id``/``--client-secret``, else ``PLURAL_CLIENT_ID`` /
``PLURAL_CLIENT_SECRET`` from the environment (the pair a worker beside it is given),
and every ``--account CLIENT_ID:SECRET``: each pair is one Plural account, and any pair is
accepted when none is given. The server and aiohttp (the ``sandbox`` extra) are imported
only when the command runs, so the other ``plural-cancel`` commands never load them.
"""

from __future__ import annotations

from typing import Any, Sequence

import click

from plural_cancel.sandbox.api import TOKEN_STYLES
from plural_cancel.sandbox.faults import MAX_LIMIT_RPS, Faults
from plural_cancel.sandbox.tokens import account_map

DEFAULT_PORT = 8800
"""The port without ``--port`` (docker-compose's and ``make run``'s ``PLURAL_BASE_URL``)."""

_RATE = click.FloatRange(0, 1)
_NON_NEGATIVE = click.FloatRange(min=0)


def faults_from_options(*, latency_ms: float = 0, error_rate: float = 0, outage: bool = False,
                        reset_rate: float = 0, timeout_rate: float = 0, hang_ms: float = 30000,
                        token_ttl: float = 3600, limit_rps: float = 0, throttle_rate: float = 0,
                        plural_throttle_rate: float = 0, retry_after: int = 1) -> dict[str, Any]:
    """The faults dict :func:`~sandbox.server.serve` takes, from the command-line options.

    ``error_rate`` is the probability of a 500; ``ValueError`` names a bad field.
    """
    faults: dict[str, Any] = {"latency_ms": latency_ms, "outage": outage,
                              "reset_rate": reset_rate, "timeout_rate": timeout_rate,
                              "hang_ms": hang_ms, "token_ttl": token_ttl, "limit_rps": limit_rps,
                              "throttle_rate": throttle_rate,
                              "plural_throttle_rate": plural_throttle_rate, "retry_after": retry_after}
    if error_rate:
        faults["error_rates"] = {"500": error_rate}
    Faults().updated(faults)  # raises ValueError naming the option's field
    return faults


def _account_pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    """``CLIENT_ID:SECRET`` -> (client id, secret); the secret may hold colons, the id cannot."""
    pairs = []
    for value in values:
        client_id, _, secret = value.partition(":")
        if not client_id or not secret:
            # Never echoed: the value may be a secret with its client id missing.
            raise click.BadParameter("expected CLIENT_ID:SECRET, both non-empty")
        pairs.append((client_id, secret))
    return pairs


@click.command(name="sandbox", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port (the line 'sandbox listening on URL' names it).")
@click.option("--latency-ms", default=0.0, type=_NON_NEGATIVE, help="Milliseconds added before every /api answer.")
@click.option("--error-rate", default=0.0, type=_RATE, help="Probability of a 500 per /api call.")
@click.option("--outage", is_flag=True, help="Every /api call answers 503.")
@click.option("--reset-rate", default=0.0, type=_RATE,
              help="Probability of a TCP reset and no answer (the call is not applied).")
@click.option("--timeout-rate", default=0.0, type=_RATE,
              help="Probability of holding the answer --hang-ms (the call is applied).")
@click.option("--hang-ms", default=30000.0, show_default=True, type=_NON_NEGATIVE,
              help="Milliseconds a timed-out answer is held.")
@click.option("--limit-rps", default=0.0, type=click.FloatRange(0, MAX_LIMIT_RPS),
              help="Plural's own limit: cancels a second per account, a 429 with Retry-After past it "
                   "[default: no limit].")
@click.option("--throttle-rate", default=0.0, type=_RATE,
              help="Probability of a 429 per cancel, whatever the limit.")
@click.option("--plural-throttle-rate", default=0.0, type=_RATE,
              help="Probability of a 400 PAYMENT_RATE_LIMIT per cancel (a throttle in Plural's words).")
@click.option("--retry-after", default=1, show_default=True, type=click.IntRange(min=0),
              help="Seconds in Retry-After on a random 429 (--throttle-rate).")
@click.option("--token-ttl", default=3600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds new access tokens live.")
@click.option("--token-style", default="expires_at", show_default=True, type=click.Choice(TOKEN_STYLES),
              help="How Generate Token states the expiry.")
@click.option("--client-id", envvar="PLURAL_CLIENT_ID", default=None,
              help="An accepted client id [default: PLURAL_CLIENT_ID; any when no account is set].")
@click.option("--client-secret", envvar="PLURAL_CLIENT_SECRET", default=None,
              help="Its secret [default: PLURAL_CLIENT_SECRET].")
@click.option("--account", "accounts", multiple=True, metavar="CLIENT_ID:SECRET", callback=_account_pairs,
              help="One more accepted account (repeatable); its tokens, faults and limit are its own.")
@click.option("--seed", type=int, default=None, help="Repeatable fault dice and generated ids.")
@click.option("--no-demo-links", is_flag=True, help="Start with no links, not even the demo ones.")
def sandbox(host: str, port: int, latency_ms: float, error_rate: float, outage: bool, reset_rate: float,
            timeout_rate: float, hang_ms: float, limit_rps: float, throttle_rate: float,
            plural_throttle_rate: float, retry_after: int, token_ttl: float, token_style: str,
            client_id: str | None, client_secret: str | None, accounts: list[tuple[str, str]],
            seed: int | None, no_demo_links: bool):
    """Run the local Plural sandbox: Plural's paths under http://HOST:PORT/api, faults under /_admin."""
    if (client_id is None) != (client_secret is None):
        raise click.UsageError("give both --client-id and --client-secret (or PLURAL_CLIENT_ID and "
                               "PLURAL_CLIENT_SECRET), or neither")
    try:
        known = account_map(accounts, client_id=client_id, client_secret=client_secret)
        faults = faults_from_options(latency_ms=latency_ms, error_rate=error_rate, outage=outage,
                                     reset_rate=reset_rate, timeout_rate=timeout_rate, hang_ms=hang_ms,
                                     token_ttl=token_ttl, limit_rps=limit_rps, throttle_rate=throttle_rate,
                                     plural_throttle_rate=plural_throttle_rate, retry_after=retry_after)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        from plural_cancel.sandbox.server import serve
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("aiohttp"):
            raise
        raise click.ClickException("the sandbox needs aiohttp: pip install 'plural-cancel[sandbox]'") from None
    try:
        serve(host, port, accounts=known, faults=faults, token_style=token_style,
              seed_demo=not no_demo_links, seed=seed)
    except OSError as err:
        raise click.ClickException(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandbox``: :func:`sandbox` under that name; returns its exit status
    (0 once stopped by SIGTERM or SIGINT, 2 on bad options, 1 otherwise)."""
    try:
        sandbox.main(args=list(argv) if argv is not None else None, prog_name="python -m sandbox")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0
