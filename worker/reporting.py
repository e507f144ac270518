"""Failure reporting to Sentry: what an on-call engineer must act on, once, and no secret.

Reported:
- every terminal failure of a cancel, once, right after the ledger recorded it
  (:func:`report_failure`): ``gave_up``, ``auth_failed`` and ``rejected`` at level
  error, ``not_cancellable`` at warning (a paid link is a business event, not a fault);
  fingerprinted by outcome and Plural's code, so one outage is one Sentry issue;
- each opening of the circuit breaker, once (:func:`report_breaker_opened`);
- anything unexpected: exceptions escaping a task (Sentry's Celery integration) and
  ERROR log lines (its logging integration).

Not reported: retries, deferrals, rate-limit waits. They are control flow, not
failure, as Sentry's own Celery integration treats ``Retry``/``Ignore``/``Reject``;
their count is a metric (:mod:`worker.metrics`), their story a log line.

Scrubbed, in events and breadcrumbs: the SDK's own :class:`EventScrubber` drops values
under sensitive keys (its default denylist plus ours: tokens, the client secret, the
customer's fields), then :class:`Redactor` masks by shape in every remaining string:
the client secret itself, bearer tokens, passwords in URLs, e-mail addresses and
phone numbers. Frame locals are never sent (see :func:`init`).

Beat jobs are monitored as Sentry cron check-ins; see :func:`init`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
import time
from datetime import timedelta
from typing import Any, Mapping

import sentry_sdk
from celery import signals
from sentry_sdk.crons import MonitorStatus, capture_checkin
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

from plural_cancel.config.settings import Settings
from plural_cancel.worker.redaction import Redactor, redactor_for

log = logging.getLogger(__name__)


def _release() -> str | None:
    """``plural-cancel@<version>`` as installed, so Sentry can tell which release failed."""
    try:
        return f"plural-cancel@{importlib.metadata.version('plural-cancel')}"
    except importlib.metadata.PackageNotFoundError:
        return None


DENYLIST = DEFAULT_DENYLIST + [
    "client_secret", "clientsecret", "access_token", "refresh_token", "bearer", "blob",
    "customer", "email", "email_id", "mobile", "mobile_number", "phone", "phone_number",
    "first_name", "last_name", "full_name", "address", "address1", "address2", "address3",
    "billing_address", "shipping_address",
]
"""Keys whose values Sentry never receives, at any depth (Plural's customer fields included)."""

REPORTED = "reported"
"""Value of a log record's ``sentry`` extra when the event was reported explicitly: the
logging integration must not report that line a second time."""

CHECKIN_EVERY = 60.0
"""Seconds between cron check-ins of a beat job that runs more often than Sentry Crons can
express (it counts whole minutes): at most one per job and worker process per this long."""

def init(settings: Settings, beat_schedule: Mapping[str, Mapping] | None = None, *,
         redactor: Redactor | None = None) -> bool:
    """Start Sentry in this worker or beat process when ``SENTRY_DSN`` is set; True if started.

    The environment is ``SENTRY_ENVIRONMENT``, else ``PLURAL_ENV`` (``uat``/``prod``).

    Beat jobs that Sentry Crons can express (whole minutes, crontabs) are monitored by
    the SDK's own ``monitor_beat_tasks`` (beat checks in when it sends the job, the worker
    when it ends); a job that runs more often (the schedule firer, every second) is excluded
    from it and checks in from the worker instead, once a minute (:data:`CHECKIN_EVERY`).
    """
    if not settings.sentry_dsn:
        return False
    frequent = _frequent_jobs(beat_schedule or {})
    redactor = redactor or redactor_for(settings)
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment or settings.plural_env,
        release=_release(),
        integrations=[CeleryIntegration(monitor_beat_tasks=True,
                                        exclude_beat_tasks=[f"^{re.escape(name)}$" for name in frequent.values()])],
        # Only the integrations named here and the SDK's defaults (logging, threading...):
        # an auto-enabled Redis integration would put command arguments into breadcrumbs.
        auto_enabling_integrations=False,
        # Frame locals carry whatever a function held (a token, a customer's record from
        # Plural) under names no denylist can guess; the stack trace alone says where.
        include_local_variables=False,
        # No personal data by default: send_default_pii is left unset (its default is off;
        # setting it is deprecated in favour of data_collection in newer SDKs) and the
        # scrubber is built with send_default_pii=False.
        event_scrubber=EventScrubber(denylist=list(DENYLIST), recursive=True, send_default_pii=False),
        before_send=lambda event, hint: _before_send(redactor, event, hint),
        before_breadcrumb=lambda crumb, hint: redactor.walk(crumb),
        max_request_body_size="never",
    )
    if frequent:
        _check_in_frequent_jobs(frequent)
    return True


def _before_send(redactor: Redactor, event: dict, hint: dict) -> dict | None:
    record = hint.get("log_record")
    if record is not None and getattr(record, "sentry", None) == REPORTED:
        return None  # reported explicitly, with tags and a fingerprint; the log line is its echo
    return redactor.walk(event)


def report_failure(*, request_id: str, payment_link_id: str, outcome: str, attempts: int,
                   error: Mapping[str, Any] | None = None, link_status: str | None = None,
                   account: str = "default") -> None:
    """Report one terminal failure of a cancel (a no-op when Sentry is off).

    ``error`` is the status record's ``last_error`` (``http_status``, ``code``, ``message``);
    ``attempts`` the calls made to Plural. One Sentry issue per (outcome, Plural code).
    """
    error = dict(error or {})
    code = error.get("code") or "none"
    status = error.get("http_status")
    detail = ", ".join(x for x in (error.get("code"), f"HTTP {status}" if status else None) if x)
    title = f"Cancel failed: {outcome}" + (f" ({detail})" if detail else "")
    tags = {"payment_link_id": payment_link_id, "request_id": request_id, "account": account, "outcome": outcome,
            "plural_code": code, "http_status": str(status) if status else "none",
            "attempts": str(attempts), "link_status": link_status or "none"}
    sentry_sdk.capture_message(
        title, level="warning" if outcome == "not_cancellable" else "error",
        tags=tags, fingerprint=["plural-cancel", "cancel-failed", outcome, code],
        contexts={"cancel": {"request_id": request_id, "payment_link_id": payment_link_id, "account": account,
                             "attempts": attempts, "link_status": link_status, "last_error": error or None}})


def report_request_id_conflict(*, request_id: str, payment_link_id: str, taken_by: str,
                               account: str = "default") -> None:
    """Report a cancel message for ``payment_link_id`` whose ``request_id`` names the cancel of
    another link (``taken_by``): that link is not cancelled, and someone must send it under a
    Request-ID of its own. One Sentry issue for all of them; an event per message."""
    sentry_sdk.capture_message(
        "Cancel message refused: its request_id names another link's cancel", level="error",
        tags={"request_id": request_id, "payment_link_id": payment_link_id, "account": account, "taken_by": taken_by},
        fingerprint=["plural-cancel", "request-id-conflict"],
        contexts={"cancel": {"request_id": request_id, "payment_link_id": payment_link_id,
                             "request_id_names_link": taken_by}})


def report_breaker_opened(*, code: str | None, http_status: int | None, cooldown: float,
                          account: str = "default") -> None:
    """Report that an account's circuit breaker opened (once per opening; ``cooldown`` in seconds)."""
    sentry_sdk.capture_message(
        "Circuit breaker opened: Plural is failing; cancels are held", level="error",
        tags={"account": account, "plural_code": code or "none",
              "http_status": str(http_status) if http_status else "none"},
        fingerprint=["plural-cancel", "breaker-opened", account],
        contexts={"breaker": {"account": account, "cooldown_seconds": cooldown, "plural_code": code,
                              "http_status": http_status}})


def _interval(schedule: Any) -> float | None:
    """Seconds between runs of a beat schedule, or None for a crontab and the like."""
    if isinstance(schedule, timedelta):
        return schedule.total_seconds()
    if isinstance(schedule, (int, float)):
        return float(schedule)
    run_every = getattr(schedule, "run_every", None)
    return run_every.total_seconds() if isinstance(run_every, timedelta) else None


def _frequent_jobs(beat_schedule: Mapping[str, Mapping]) -> dict[str, str]:
    """Task name -> beat entry name, for the jobs that run more often than once a minute."""
    out = {}
    for name, entry in beat_schedule.items():
        seconds = _interval(entry.get("schedule"))
        if seconds is not None and seconds < 60 and entry.get("task"):
            out[entry["task"]] = name
    return out


def _check_in_frequent_jobs(jobs: dict[str, str]) -> None:
    """OK check-ins at most every ``CHECKIN_EVERY`` seconds per job; every failure at once."""
    last: dict[str, float] = {}
    lock = threading.Lock()
    config = {"schedule": {"type": "interval", "value": 1, "unit": "minute"}, "checkin_margin": 2,
              "max_runtime": 5, "timezone": "UTC"}

    def check_in(sender=None, ok: bool = True, **kwargs):
        slug = jobs.get(getattr(sender, "name", None))
        if slug is None:
            return
        now = time.monotonic()
        with lock:
            if ok and now - last.get(slug, -CHECKIN_EVERY) < CHECKIN_EVERY:
                return
            last[slug] = now
        capture_checkin(monitor_slug=slug, monitor_config=config,
                        status=MonitorStatus.OK if ok else MonitorStatus.ERROR)

    # Strong references and fixed uids: the handlers live as long as the process, once.
    signals.task_success.connect(check_in, weak=False, dispatch_uid="plural-cancel-checkin-ok")
    signals.task_failure.connect(lambda sender=None, **kw: check_in(sender, ok=False), weak=False,
                                 dispatch_uid="plural-cancel-checkin-error")
