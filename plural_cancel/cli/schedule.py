"""Commands for many cancels and later ones: ``bulk``, ``schedule``, ``unschedule``.

``bulk FILE`` reads one payment link id per line (blank lines and ``#`` comments
skipped), or a CSV with a ``payment_link_id`` column, in UTF-8. The settings, then every
line, are checked before anything is sent; each bad line is named on stderr with its line
number and reason (a file that is not UTF-8: its first bad byte, and nothing is sent).
The valid ones are enqueued (each distinct id once) unless ``--strict``; the exit
status is then 2 when any line was bad, so a script notices, and 0 otherwise. The
summary ends with the time the backlog needs at the account's rate limit: every cancel
of the account not yet finished, the file's and any other producer's, over its one limit.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Iterable, TextIO

import click

from plural_cancel.cli.base import Failure, UsageFailure, account_option, configured_app, known_account
from plural_cancel.worker.validation import validate_payment_link_id

CHUNK = 1000
"""Links per ``enqueue_many`` call (one progress-bar step, a few Redis round trips)."""

SHOWN_INVALID = 100
"""Bad lines named one by one on stderr; the rest are only counted."""

POLL_INTERVAL = 1.0
"""Seconds between status reads while ``--wait`` follows the outcomes."""

COLUMN = "payment_link_id"


@dataclass
class LinkFile:
    """What a bulk file holds: valid link ids in order, bad lines, repeated ids."""

    links: list[str] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) of each bad line."""
    duplicates: int = 0
    """Lines naming an id seen on an earlier line (enqueued once)."""


def read_link_file(lines: Iterable[str]) -> LinkFile:
    """Parse a bulk file: plain (one id a line) or CSV with a ``payment_link_id`` header."""
    result, seen = LinkFile(), set()
    numbered = _significant(enumerate(lines, start=1))
    first = next(numbered, None)
    if first is None:
        return result
    number, line = first
    header = [cell.strip() for cell in next(csv.reader([line]))]
    if COLUMN in header:
        rows = _csv_rows(numbered, header.index(COLUMN))
    else:
        rows = ((n, text.strip()) for n, text in _chain(first, numbered))
    for number, value in rows:
        try:
            validate_payment_link_id(value)
        except ValueError as exc:
            result.invalid.append((number, str(exc)))
            continue
        if value in seen:
            result.duplicates += 1
            continue
        seen.add(value)
        result.links.append(value)
    return result


def text_lines(file: BinaryIO, name: str) -> io.StringIO:
    """``file`` read whole as UTF-8 (a byte-order mark allowed), its lines ended as Python's
    text mode ends them. A byte that is not UTF-8 is bad input: :class:`UsageFailure` naming
    its line and its byte in that line (from 1), before anything is sent."""
    data = file.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]  # UTF-8 up to the bad byte
        line = before.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
        byte = exc.start - max(before.rfind(b"\n"), before.rfind(b"\r"))
        raise UsageFailure(f"{name} line {line}, byte {byte}: not UTF-8 text (0x{data[exc.start]:02x}); "
                           "nothing enqueued") from None
    return io.StringIO(text, newline=None)


def _significant(numbered):
    for number, line in numbered:
        text = line.strip()
        if text and not text.startswith("#"):
            yield number, line.rstrip("\r\n")


def _chain(first, rest):
    yield first
    yield from rest


def _csv_rows(numbered, column: int):
    for number, line in numbered:
        # Row by row, so each value keeps its own line number (an id never spans lines).
        row = next(csv.reader([line]), [])
        yield number, (row[column].strip() if column < len(row) else "")


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option("--wait", is_flag=True, help="Follow the cancels until all have finished; print counts by outcome.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="With --wait: stop waiting after this many seconds (exit 1).")
@click.option("--output", type=click.File("w"), default=None,
              help="Write 'payment_link_id,request_id' for every link enqueued.")
@click.option("--strict", is_flag=True, help="Enqueue nothing when any line is bad.")
@account_option("The Plural account whose links they all are: a name of PLURAL_ACCOUNTS_FILE that the "
                "workers know [default: the default account]. An unknown one: exit 2, before the file "
                "is read.")
def bulk(file: BinaryIO, wait: bool, timeout: float | None, output: TextIO | None, strict: bool,
         account: str | None):
    """Cancel every payment link listed in FILE ('-' for stdin).

    One id per line (blank lines and # comments skipped), or a CSV with a
    payment_link_id column. Bad lines are named with their line numbers; the rest are
    enqueued. The summary says how long every waiting cancel of the account takes at its
    rate limit (PLURAL_RATE_LIMIT, or the account's rate_limit).
    Exit status 2 when any line was bad, 1 on other errors, 0 otherwise.
    """
    import redis
    from kombu.exceptions import OperationalError

    from plural_cancel.tasks.producer import enqueue_many

    app = configured_app()  # a bad setting or account is refused before the file is read
    account = known_account(app, account)
    name = getattr(file, "name", "FILE")
    parsed = read_link_file(text_lines(file, name))
    for number, reason in parsed.invalid[:SHOWN_INVALID]:
        click.echo(f"plural-cancel: {name} line {number}: {reason}", err=True)
    if len(parsed.invalid) > SHOWN_INVALID:
        click.echo(f"plural-cancel: ... and {len(parsed.invalid) - SHOWN_INVALID} more bad lines", err=True)
    if not parsed.links:
        raise UsageFailure(f"{name}: no valid payment link ids ({_lines(len(parsed.invalid))} bad)")
    if strict and parsed.invalid:
        raise UsageFailure(f"{name}: {_lines(len(parsed.invalid))} bad; nothing enqueued (--strict)")

    request_ids: list[str] = []
    try:
        with _progressbar(len(parsed.links), "enqueueing") as bar:
            for start in range(0, len(parsed.links), CHUNK):
                chunk = parsed.links[start:start + CHUNK]
                ids = enqueue_many(chunk, account=account, app=app)
                request_ids += ids
                if output is not None:
                    output.writelines(f"{link},{rid}\n" for link, rid in zip(chunk, ids))
                bar.update(len(chunk))
        waiting, rate = backlog(app, account)
    except (redis.RedisError, OperationalError) as exc:  # base.Commands makes it one line
        exc.add_note(f"{len(request_ids)} of {len(parsed.links)} enqueued before it")
        raise

    click.echo(f"accepted    {len(request_ids)}")
    click.echo(f"duplicates  {parsed.duplicates}")
    click.echo(f"invalid     {len(parsed.invalid)}")
    click.echo(f"backlog     {len(request_ids):,} enqueued; with {waiting:,} waiting in all, "
               f"about {_duration(waiting / rate)} at {rate:g}/s")
    if wait:
        outcomes, pending = _follow(app, request_ids, timeout)
        for outcome, count in sorted(outcomes.items()):
            click.echo(f"{outcome:20}{count}")
        if pending:
            raise Failure(f"{pending} cancels still unfinished after {timeout:g} s")
    if parsed.invalid:
        raise UsageFailure(f"{name}: {_lines(len(parsed.invalid))} bad, skipped; "
                           f"the other {len(request_ids)} links were enqueued")


def backlog(app, account: str) -> tuple[int, float]:
    """``account``'s cancels not yet finished (queued, running or retrying), every producer's,
    and its rate limit (calls per second): what the workers must send through that limit
    before the account's queue is empty."""
    rt = app.runtime
    rate = rt.published_accounts().get(account, app.settings.rate_limit)
    return sum(rt.ledger.account_stats([account])[account]["active"].values()), rate


def _duration(seconds: float) -> str:
    """``40 s``, ``17 min``, ``1 h 40 min``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _progressbar(length: int, label: str):
    # On a terminal only: elsewhere (cron, a pipe) click would print just the label, a
    # line that says nothing and would stand before a one-line error.
    return click.progressbar(length=length, label=label, file=sys.stderr, hidden=not sys.stderr.isatty())


def _lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"


def _follow(app, request_ids: list[str], timeout: float | None) -> tuple[Counter, int]:
    """Poll until every cancel is terminal (or ``timeout`` seconds); returns (outcomes, still pending)."""
    from plural_cancel.tasks.producer import get_statuses

    outcomes: Counter = Counter()
    pending = list(request_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _progressbar(len(pending), "cancelling") as bar:
        while pending:
            still = []
            for request_id, status in zip(pending, get_statuses(pending, app=app)):
                if status and status["state"] in ("succeeded", "failed"):
                    outcomes[status["outcome"]] += 1
                else:
                    still.append(request_id)
            bar.update(len(pending) - len(still))
            pending = still
            if pending and deadline is not None and time.monotonic() >= deadline:
                break
            if pending:
                time.sleep(POLL_INTERVAL)
    return outcomes, len(pending)


@click.command()
@click.argument("payment_link_id")
@click.option("--at", "at_text", required=True, metavar="ISO-8601",
              help="When, with a timezone: 2025-03-06T08:27:55Z or 2025-03-06T13:57:55+05:30.")
@click.option("--request-id", help="Idempotency key (1-50 of A-Za-z0-9._:-); kept from an earlier schedule "
                                   "of the link, else a new UUID4.")
@account_option("The Plural account whose link it is: a name of PLURAL_ACCOUNTS_FILE that the workers "
                "know [default: the default account]. A link is scheduled once per account. An unknown "
                "one: exit 2, nothing scheduled.")
def schedule(payment_link_id: str, at_text: str, request_id: str | None, account: str | None):
    """Cancel PAYMENT_LINK_ID at a given time; prints its Request-ID. Again: moves it."""
    from plural_cancel.tasks.producer import schedule_cancel

    try:
        at = datetime.fromisoformat(at_text)
    except ValueError:
        raise UsageFailure(f"--at: must be an ISO 8601 date-time with a timezone, e.g. "
                           f"2025-03-06T08:27:55Z (got {at_text[:40]!r})") from None
    if at.utcoffset() is None:
        raise UsageFailure(f"--at: needs a timezone, Z or an offset such as +05:30 (got {at_text[:40]!r})")
    app = configured_app()
    try:
        click.echo(schedule_cancel(payment_link_id, at, request_id, account=account, app=app))
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None


@click.command()
@click.argument("payment_link_id")
@account_option("The Plural account the cancel was scheduled for (as given to schedule) [default: the "
                "default account]. An unknown one: exit 2, nothing changed.")
def unschedule(payment_link_id: str, account: str | None):
    """Take back the scheduled cancel of PAYMENT_LINK_ID. Exit 1 when too late or none."""
    from plural_cancel.tasks.producer import get_schedule, unschedule_cancel

    app = configured_app()
    try:
        removed = unschedule_cancel(payment_link_id, account=account, app=app)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    link = payment_link_id if account is None else f"{payment_link_id} of account {account}"
    if removed:
        click.echo(f"unscheduled: {link} will not be cancelled")
        return
    info = get_schedule(payment_link_id, account=account, app=app)
    if info and info["state"] == "fired":
        raise Failure(f"too late: the cancel of {link} has fired as request_id "
                      f"{info['request_id']} (plural-cancel status {info['request_id']})")
    raise Failure(f"nothing scheduled for {link}")


COMMANDS = [bulk, schedule, unschedule]
