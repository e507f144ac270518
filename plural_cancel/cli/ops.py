"""Commands for whoever runs the system: ``failed list|retry``, ``stats`` and ``check``
(``health`` has a module of its own).

``failed retry`` sends a dead letter back the way ``enqueue`` sends a new cancel: the
record turns ``queued`` in the ledger and enters its due index (one Lua script), then
its message is published, naming the account its record names. Its Request-ID stays the
same, so Plural sees one idempotent cancel however many times it is retried.
"""

from __future__ import annotations

import json
import time

import click
import redis
from kombu.exceptions import OperationalError

from plural_cancel.cli.base import (
    Failure,
    UsageFailure,
    account_option,
    configured_app,
    known_account,
    load_settings,
    master_not_found,
)
from plural_cancel.errors import ConfigError
from plural_cancel.worker.links import format_timestamp

RETRY_BATCH = 500
"""Dead letters requeued and published per round trip by ``failed retry --all``."""


@click.group()
def failed():
    """Dead letters: cancels that ended ``failed`` (gave_up, rejected, auth_failed, not_cancellable)."""


@failed.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the status records as a JSON array.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=0),
              help="Show the latest N failures (0: all).")
@account_option("Only this Plural account's failures (a name the workers know; an unknown one: exit 2). "
                "The filter reads every dead letter's record, each of which names its account.")
def failed_list(as_json: bool, limit: int, account: str | None):
    """List failed cancels, latest first."""
    app = configured_app()
    records = _dead_letters(app, account, limit)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("no failed cancels")
        return
    rows = [("FAILED_AT", "REQUEST_ID", "PAYMENT_LINK_ID", "OUTCOME", "ATTEMPTS", "LAST_ERROR")]
    for r in records:
        error = r["last_error"] or {}
        detail = " ".join(str(x) for x in (error.get("http_status"), error.get("code")) if x)
        rows.append((r["updated_at"] or "", r["request_id"], r["payment_link_id"], r["outcome"] or "",
                     str(r["attempts"]), detail or (r["link_status"] or "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@failed.command("retry")
@click.argument("request_id", required=False)
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed cancel.")
@account_option("With --all: only this Plural account's failed cancels (a name the workers know; an "
                "unknown one: exit 2), read from their records: after fixing an account's secret, "
                "retry its auth_failed cancels.")
def failed_retry(request_id: str | None, retry_all: bool, account: str | None):
    """Send failed cancel REQUEST_ID (or --all) back to the queue with a fresh retry budget.

    Same Request-ID, same Plural account, attempts kept, a new deadline of now +
    CANCEL_RETRY_BUDGET seconds.
    """
    from plural_cancel.worker.publisher import publish
    from plural_cancel.worker.validation import validate_request_id

    if bool(request_id) == retry_all:
        raise UsageFailure("give either a REQUEST_ID or --all")
    if request_id and account is not None:
        raise UsageFailure("--account goes with --all: a REQUEST_ID is retried for the account its record names")
    if request_id:
        try:
            validate_request_id(request_id)
        except ValueError as exc:
            raise UsageFailure(str(exc)) from None
    app = configured_app()
    ledger = app.runtime.ledger
    requeued, skipped = 0, []
    try:
        # --all takes a snapshot first: a cancel that fails again meanwhile waits for the next run.
        ids = [request_id] if request_id else [r["request_id"] for r in _dead_letters(app, account)]
        for start in range(0, len(ids), RETRY_BATCH):
            results = ledger.requeue(ids[start:start + RETRY_BATCH])
            publish(app, [(rid, link, *account) for rid, verdict, link, *account in results if verdict == "requeued"])
            skipped += [(rid, verdict) for rid, verdict, *_ in results if verdict not in ("requeued", "following")]
            requeued += sum(verdict in ("requeued", "following") for _, verdict, *_ in results)
    except (redis.RedisError, OperationalError) as exc:  # base.Commands makes it one line
        if requeued:
            exc.add_note(f"{requeued} requeued before it")
        raise
    if request_id:
        if skipped:
            why = "unknown or expired" if skipped[0][1] == "missing" else "not failed"
            raise Failure(f"no failed cancel with request_id {request_id!r} ({why})")
        click.echo(f"requeued {request_id}")
        return
    click.echo(f"requeued {requeued} failed cancel{'s' if requeued != 1 else ''}"
               + (f"; {len(skipped)} no longer failed or expired" if skipped else ""))


def _dead_letters(app, account: str | None, limit: int = 0) -> list[dict]:
    """The records of dead letters, latest first, the latest ``limit`` (0: all); with
    ``account``, that account's only (it must be one the workers know), read from every
    dead letter's record: the set of dead letters is the fleet's."""
    ledger = app.runtime.ledger
    if account is None:
        return ledger.failed(limit)
    name = known_account(app, account)
    records = [record for record in ledger.failed() if record["account"] == name]
    return records[:limit] if limit else records


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@account_option("Only this Plural account's figures: its cancels queued, running and retrying, its "
                "backlog, breaker and rate (a name the workers know; an unknown one: exit 2).")
def stats(as_json: bool, account: str | None):
    """Cancels by state and outcome, the queue, the backlog, deferred cancels, the breaker, the rate and
    the malformed messages dropped; then one line per Plural account with cancels queued,
    running, retrying or in its backlog, or with its breaker not closed.

    Read from counters the ledger keeps (no scan of the records): succeeded, failed and
    the outcomes count the cancels finished within the last RESULT_TTL seconds. The
    breaker and rate lines are the default account's; --json holds every account's
    figures under "accounts".
    """
    from plural_cancel.worker.metrics import snapshot

    app = configured_app()
    name = None if account is None else known_account(app, account)
    snap = snapshot(app.runtime)
    accounts = {n: _account_figures(own) for n, own in sorted(snap["accounts"].items())}
    if name is not None:
        if name not in accounts:
            raise Failure(f"account {name!r}: no worker has published it yet (it is in this host's "
                          "PLURAL_ACCOUNTS_FILE), so nothing is counted for it")
        _print_account(name, accounts[name], as_json, app.settings.breaker_window)
        return
    states, outcomes, breaker = snap["states"], snap["outcomes"], snap["breaker"]
    figures = {
        "states": states, "outcomes": outcomes, "queue_depth": snap["queue_depth"], "backlog": snap["backlog"],
        "deferred": snap["deferred"], "dead_letters": snap["dead_letters"],
        "breaker": _breaker_figures(breaker),
        "rate": {"limit_per_second": app.settings.rate_limit, "current_per_second": round(snap["rate"], 3),
                 "throttled_share": round(snap["throttled_share"], 3)},
        "malformed": snap["malformed"],
        "unreplicated_writes": snap["unreplicated_writes"],
        "consumer_groups": snap["consumer_groups"],
        "accounts": accounts,
    }
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo("states        " + "  ".join(f"{k} {n}" for k, n in states.items()))
    click.echo("outcomes      " + ("  ".join(f"{k} {n}" for k, n in outcomes.items()) or "none yet"))
    click.echo(f"queue         {snap['queue_depth']} messages waiting")
    click.echo(f"backlog       {snap['backlog']} bulk cancels waiting their turn in the ledger")
    click.echo(f"deferred      {snap['deferred']} cancels waiting for their time")
    click.echo(f"dead letters  {snap['dead_letters']} (plural-cancel failed list)")
    click.echo(f"breaker       {_breaker_line(figures['breaker'], app.settings.breaker_window)}")
    click.echo(f"rate          {_rate_line(figures['rate'])}")
    click.echo("malformed     " + "  ".join(f"{k} {n}" for k, n in snap["malformed"].items())
               + " (messages dropped, every worker; the worker log says why)")
    click.echo(f"unreplicated  {snap['unreplicated_writes']} producer writes with no replica to hold them "
               "(REDIS_WAIT_REPLICAS=auto)")
    for group, g in snap["consumer_groups"].items():
        behind = "" if g["oldest_unread_seconds"] is None else f", oldest unread {g['oldest_unread_seconds']:.0f} s old"
        missed = "; some events were trimmed before it read them" if g["missed"] else ""
        lag = "?" if g["lag"] is None else g["lag"]
        click.echo(f"consumers     {group}: {lag} unread{behind}, {g['pending']} pending{missed}")
    for n, own in accounts.items():
        if any(own["states"].values()) or own["backlog"] or own["breaker"]["state"] != "closed":
            click.echo(f"account {n}: " + ", ".join(f"{k} {v}" for k, v in own["states"].items())
                       + f", backlog {own['backlog']}, breaker {own['breaker']['state']}, "
                       f"rate {own['rate']['current_per_second']:.3g}/s, "
                       f"throttled {own['rate']['throttled_share']:.0%}")


def _breaker_figures(breaker: dict) -> dict:
    """A breaker's state (``RedisCircuitBreaker.state``) as ``stats --json`` shows it."""
    reopens_at = breaker["reopens_at"]
    return {"state": breaker["state"], "links_failing": breaker["links_failing"],
            "links_called": breaker["links_called"],
            "reopens_at": None if reopens_at is None else format_timestamp(reopens_at, "seconds")}


def _account_figures(own: dict) -> dict:
    """One account's figures of ``metrics.snapshot`` (``shared["accounts"][name]``) as ``stats
    --json`` shows them."""
    return {"states": own["active"], "backlog": own["backlog"], "breaker": _breaker_figures(own["breaker"]),
            "rate": {"limit_per_second": own["limit"], "current_per_second": round(own["rate"], 3),
                     "throttled_share": round(own["throttled_share"], 3)}}


def _breaker_line(breaker: dict, window: float) -> str:
    reopens = f", reopens at {breaker['reopens_at']}" if breaker["state"] != "closed" else ""
    return (f"{breaker['state']} ({breaker['links_failing']} of {breaker['links_called']} links failing "
            f"in the last {window:g} s{reopens})")


def _rate_line(rate: dict) -> str:
    return (f"{rate['current_per_second']:.3g}/s now ({rate['throttled_share']:.0%} of recent calls throttled), "
            f"limit {rate['limit_per_second']:g}/s")


def _print_account(name: str, figures: dict, as_json: bool, window: float) -> None:
    """``stats --account NAME``: that account's figures alone."""
    if as_json:
        click.echo(json.dumps({"account": name, **figures}, indent=2))
        return
    click.echo(f"account       {name}")
    click.echo("states        " + "  ".join(f"{k} {n}" for k, n in figures["states"].items()))
    click.echo(f"backlog       {figures['backlog']} bulk cancels waiting their turn in the ledger")
    click.echo(f"breaker       {_breaker_line(figures['breaker'], window)}")
    click.echo(f"rate          {_rate_line(figures['rate'])}")


@click.command()
@account_option("Check only this account's token: a name of this host's PLURAL_ACCOUNTS_FILE, or default "
                "(an unknown one: exit 2).")
def check(account: str | None):
    """Check the settings, that Redis answers and keeps this host's time, and that each Plural
    account in force (PLURAL_ACCOUNTS_FILE's, and default from PLURAL_CLIENT_ID) gets a token.

    One line per check, one per account's token ("token NAME: ok" or "token NAME: FAILED
    (why)"; a client id shown by its first characters, a secret never); exit status 1 when
    any check fails, 2 when the settings, the accounts file or --account are bad.
    """
    from plural_cancel.worker.delivery import SLOT_LATENESS
    from plural_cancel.worker.redis_clock import CLOCK_OFFSET_LIMIT, clock_offset
    from plural_cancel.worker.runtime import Runtime
    from plural_cancel.worker.validation import validate_account_name

    settings = load_settings()
    runtime = Runtime(settings)
    try:
        try:
            accounts = runtime.book.accounts()
            if not accounts:
                settings.require_credentials()  # names the variable a worker lacks
        except ConfigError as exc:
            raise UsageFailure(f"configuration error: {exc}") from None
        if account is not None:
            try:
                validate_account_name(account)
            except ValueError as exc:
                raise UsageFailure(str(exc)) from None
            if account not in accounts:
                raise UsageFailure(f"account: {account!r} is not an account of this host (its accounts: "
                                   f"{', '.join(sorted(accounts))}; see PLURAL_ACCOUNTS_FILE)")
        click.echo("settings   ok")
        try:
            trip = min(_round_trip(runtime.redis) for _ in range(5))
        except redis.RedisError as exc:
            why = type(exc).__name__
            if settings.redis_sentinels and isinstance(exc, redis.sentinel.MasterNotFoundError):
                why = master_not_found(exc, settings)
            raise Failure(f"redis      unreachable: {why}") from None
        if trip >= SLOT_LATENESS:
            # A PUT leaves within SLOT_LATENESS of its rate-limit slot, counted from when the
            # worker asked Redis for it: a round trip this long gives every slot up.
            raise Failure(f"redis      answers in {trip * 1000:.0f} ms, but a cancel's PUT must leave within "
                          f"{SLOT_LATENESS * 1000:.0f} ms of asking Redis for its rate-limit slot: every slot "
                          "would be given up. Run Redis near the workers")
        click.echo(f"redis      ok (round trip {trip * 1000:.1f} ms)")
        offset = min((clock_offset(runtime.redis) for _ in range(3)), key=abs)
        if abs(offset) > CLOCK_OFFSET_LIMIT:
            raise Failure(f"clock      this host's clock is {offset:+.1f} s off Redis's (more than "
                          f"{CLOCK_OFFSET_LIMIT:g} s): Plural sees it in every Request-Timestamp; sync it (NTP)")
        click.echo(f"clock      ok ({offset * 1000:+.0f} ms off Redis's)")
        failed = [name for name in ([account] if account else sorted(accounts))
                  if not _check_token(name, accounts[name], runtime)]
    finally:
        runtime.close()
    if failed:
        checked = 1 if account else len(accounts)
        raise Failure(f"no Plural token for {len(failed)} of {checked} account{'s' if checked != 1 else ''}: "
                      + ", ".join(failed))


SHOWN_CLIENT_ID = 4
"""Characters of a client id that ``check`` shows: enough to tell which credentials were
used, not the whole id."""


def _check_token(name: str, account, runtime) -> bool:
    """Ask Plural for a token of ``account`` (a ``config.accounts.Account``) and print one line
    saying how it went; True when one came."""
    from plural_cancel.errors import PluralAuthError

    try:
        runtime.lane(name).plural.generate_token()
    except Exception as exc:  # every error is reported the same way here: one line
        kind = "auth_failed" if isinstance(exc, PluralAuthError) else type(exc).__name__
        click.echo(f"token {name}: FAILED ({kind}: {exc})")
        return False
    click.echo(f"token {name}: ok (client id {account.client_id[:SHOWN_CLIENT_ID]}...)")
    return True


def _round_trip(client: redis.Redis) -> float:
    """Seconds one PING takes."""
    started = time.monotonic()
    client.ping()
    return time.monotonic() - started


COMMANDS = [failed, stats, check]
