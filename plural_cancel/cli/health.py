"""``plural-cancel health``: this host's worker or beat judged from its heartbeat file.

A module of its own, which loads neither Celery nor requests (the group loads
the other commands only when one of them is called): every container's healthcheck runs
it every few seconds.
"""

from __future__ import annotations

import click

from plural_cancel import heartbeat
from plural_cancel.cli.base import Failure, UsageFailure, load_settings


@click.command()
@click.option("--worker", "kind", flag_value="worker", help="Judge this host's worker.")
@click.option("--beat", "kind", flag_value="beat", help="Judge this host's beat.")
@click.option("--ready", is_flag=True, help="Readiness (worker: connected to Redis; beat: ticking, so holding "
                                             "the lock) instead of liveness.")
@click.option("--max-age", default=heartbeat.DEFAULT_MAX_AGE, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds: the oldest heartbeat (and, with --ready, loop turn or tick) judged fresh.")
def health(kind: str | None, ready: bool, max_age: float):
    """Exit 0 when this host's worker or beat is live (--ready: ready), 1 when not; one line either way.

    Reads the heartbeat file the process rewrites in HEALTH_DIR every 2 s, with no
    Redis round trip: a worker or beat waiting for Redis stays live (it carries on by
    itself once Redis is back) but not ready. For container healthchecks and
    liveness/readiness probes.
    """
    if kind is None:
        raise UsageFailure("give --worker or --beat")
    verdict = heartbeat.check(load_settings().health_dir, kind, max_age, ready)
    if not verdict.ok:
        raise Failure(verdict.line)
    click.echo(verdict.line)
