"""Commands for whoever runs the system: ``failed list|retry``, ``stats`` and ``check``
(``health`` has a module of its own).

``failed retry`` sends a dead letter back the way ``enqueue`` sends a new cancel: the
record turns ``queued`` in the ledger and enters its due index (one Lua script), then
its message is published. Its Request-ID stays the same, so Plural sees one
idempotent cancel however many times it is retried.
"""

from __future__ import annotations

import json
import time

import click
import redis
from kombu.exceptions import OperationalError

from plural_cancel.cli.base import Failure, UsageFailure, configured_app, load_settings, master_not_found
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
def failed_list(as_json: bool, limit: int):
    """List failed cancels, latest first."""
    app = configured_app()
    records = app.runtime.ledger.failed(limit)
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
def failed_retry(request_id: str | None, retry_all: bool):
    """Send failed cancel REQUEST_ID (or --all) back to the queue with a fresh retry budget.

    Same Request-ID, attempts kept, a new deadline of now + CANCEL_RETRY_BUDGET seconds.
    """
    from plural_cancel.worker.publisher import publish
    from plural_cancel.worker.validation import validate_request_id

    if bool(request_id) == retry_all:
        raise UsageFailure("give either a REQUEST_ID or --all")
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
        ids = [request_id] if request_id else [r["request_id"] for r in ledger.failed()]
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def stats(as_json: bool):
    """Cancels by state and outcome, the queue, the backlog, deferred cancels, the breaker, the rate and
    the malformed messages dropped.

    Read from counters the ledger keeps (no scan of the records): succeeded, failed and
    the outcomes count the cancels finished within the last RESULT_TTL seconds.
    """
    from plural_cancel.worker.metrics import snapshot

    app = configured_app()
    snap = snapshot(app.runtime)
    states, outcomes, breaker = snap["states"], snap["outcomes"], snap["breaker"]
    reopens_at = breaker["reopens_at"]
    figures = {
        "states": states, "outcomes": outcomes, "queue_depth": snap["queue_depth"], "backlog": snap["backlog"],
        "deferred": snap["deferred"], "dead_letters": snap["dead_letters"],
        "breaker": {"state": breaker["state"], "links_failing": breaker["links_failing"],
                    "links_called": breaker["links_called"],
                    "reopens_at": None if reopens_at is None else format_timestamp(reopens_at, "seconds")},
        "rate": {"limit_per_second": app.settings.rate_limit, "current_per_second": round(snap["rate"], 3),
                 "throttled_share": round(snap["throttled_share"], 3)},
        "malformed": snap["malformed"],
        "unreplicated_writes": snap["unreplicated_writes"],
        "consumer_groups": snap["consumer_groups"],
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
    reopens = f", reopens at {figures['breaker']['reopens_at']}" if breaker["state"] != "closed" else ""
    click.echo(f"breaker       {breaker['state']} ({breaker['links_failing']} of {breaker['links_called']} links "
               f"failing in the last {app.settings.breaker_window:g} s{reopens})")
    click.echo(f"rate          {snap['rate']:.3g}/s now ({snap['throttled_share']:.0%} of recent calls throttled), "
               f"limit {app.settings.rate_limit:g}/s")
    click.echo("malformed     " + "  ".join(f"{k} {n}" for k, n in snap["malformed"].items())
               + " (messages dropped, every worker; the worker log says why)")
    click.echo(f"unreplicated  {snap['unreplicated_writes']} producer writes with no replica to hold them "
               "(REDIS_WAIT_REPLICAS=auto)")
    for group, g in snap["consumer_groups"].items():
        behind = "" if g["oldest_unread_seconds"] is None else f", oldest unread {g['oldest_unread_seconds']:.0f} s old"
        missed = "; some events were trimmed before it read them" if g["missed"] else ""
        lag = "?" if g["lag"] is None else g["lag"]
        click.echo(f"consumers     {group}: {lag} unread{behind}, {g['pending']} pending{missed}")


@click.command()
def check():
    """Check the settings, that Redis answers and that a Plural token can be had."""
    from plural_cancel.worker.delivery import SLOT_LATENESS
    from plural_cancel.worker.redis_clock import CLOCK_OFFSET_LIMIT, clock_offset
    from plural_cancel.worker.runtime import Runtime

    settings = load_settings()
    try:
        settings.require_credentials()
    except ConfigError as exc:
        raise UsageFailure(f"configuration error: {exc}") from None
    click.echo("settings   ok")
    runtime = Runtime(settings)
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
        runtime.close()
        raise Failure(f"clock      this host's clock is {offset:+.1f} s off Redis's (more than "
                      f"{CLOCK_OFFSET_LIMIT:g} s): Plural sees it in every Request-Timestamp; sync it (NTP)")
    click.echo(f"clock      ok ({offset * 1000:+.0f} ms off Redis's)")
    try:
        runtime.plural.generate_token()
    except Exception as exc:  # every Plural error is reported the same way here: one line
        raise Failure(f"plural     no token: {exc}") from None
    finally:
        runtime.close()
    click.echo("plural     ok (token obtained)")


def _round_trip(client: redis.Redis) -> float:
    """Seconds one PING takes."""
    started = time.monotonic()
    client.ping()
    return time.monotonic() - started


COMMANDS = [failed, stats, check]
