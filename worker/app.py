"""The Celery app: one object, configured in one ``conf.update`` from the settings.

``celery -A worker worker`` and ``celery -A worker beat`` load it from the repo root.
Settings are read from the environment the first time the app is configured, so a
producer that imports ``tasks`` reads them once too. An app for other settings is built,
never re-pointed: :func:`create_app` (the command line, tests, a producer with two Redis).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import redis
from celery import Celery, bootsteps, signals
from kombu.exceptions import OperationalError

from plural_cancel.config.celery import PUMP_INTERVAL, celery_config
from plural_cancel.config.settings import Settings
from plural_cancel.errors import REDIS_AWAY, ConfigError, refusal_code, write_refused
from plural_cancel.worker import accounts, malformed
from plural_cancel.worker.broker import message_dropped
from plural_cancel.worker.health import BrokerReady, WorkerHeartbeat
from plural_cancel.worker.publisher import pump, send_callbacks
from plural_cancel.worker.redis_clock import CLOCK_OFFSET_LIMIT, clock_offset
from plural_cancel.worker.runtime import Runtime

log = logging.getLogger(__name__)


class CancelApp(Celery):
    """A Celery app that carries the product's settings and its per-process runtime."""

    def __init__(self, settings: Settings | None = None, runtime: Runtime | None = None, **kwargs):
        super().__init__("plural-cancel", include=["plural_cancel.tasks.cancel", "plural_cancel.tasks.periodic"],
                         **kwargs)
        self._settings = settings
        self._runtime: Runtime | None = runtime
        self._runtime_lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def on_configure(self) -> None:
        self.conf.update(celery_config(self.settings))

    @property
    def runtime(self) -> Runtime:
        """This process's runtime, built on first use (after any fork)."""
        if self._runtime is None:
            with self._runtime_lock:
                if self._runtime is None:
                    self._runtime = Runtime(self.settings, on_reload_failure=_count_reload_failure,
                                            token_failures=_token_failure_counter)
        return self._runtime

    def close(self) -> None:
        """Close this app's Redis connections and its broker pool (an app a producer built, when done)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        super().close()


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> CancelApp:
    """A new app for ``settings`` (read from the environment when None), for a producer, the
    command line or a test to build and pass on (the API's ``app=``); ``runtime``: one built
    for these settings with a clock or jitter of its own (tests). Nothing is shared with the
    module's :data:`app`, the worker's, which never changes its settings; this one is not
    made Celery's current app."""
    return CancelApp(settings, runtime, set_as_current=False)


CLOCK_CHECK_INTERVAL = 60.0
"""Seconds between two looks at this host's clock against Redis's (:class:`ClockWatch`)."""


class ClockWatch(bootsteps.StartStopStep):
    """Warns, once a minute while it lasts, when this host's clock is more than
    ``CLOCK_OFFSET_LIMIT`` off Redis's: every due time is Redis's, but Plural sees this
    host's clock in each ``Request-Timestamp`` (``plural-cancel check`` and the metric
    ``plural_cancel_clock_offset_seconds`` show it too)."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.tref = None

    def start(self, worker):
        def look():
            try:
                offset = clock_offset(worker.app.runtime.redis)
            except Exception:  # Redis away: the pump says so; nothing to judge the clock by
                return
            if abs(offset) > CLOCK_OFFSET_LIMIT:
                log.warning("this host's clock is %+.1f s off Redis's: Plural sees it in every Request-Timestamp; "
                            "sync it (NTP)", offset, extra={"clock_offset": round(offset, 3)})

        look()
        self.tref = worker.timer.call_repeatedly(CLOCK_CHECK_INTERVAL, look, priority=0)

    def stop(self, worker):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


SKIPPED_EVERY = 60.0
"""Seconds between two "skipped" lines of one pump step while Redis stays away."""


def refresh_accounts(app_) -> None:
    """The accounts file read again if it changed, and the accounts published (``worker.accounts.refresh``)."""
    accounts.refresh(app_.runtime)


def _count_reload_failure(exc: Exception) -> None:
    """A reload of the accounts file failed (``config.accounts`` logged it): counted."""
    # Imported here, as the other handlers import it: producers load this app too, and need
    # no prometheus-client.
    from plural_cancel.worker import metrics

    metrics.ACCOUNTS_RELOAD_FAILURES.inc()


def _token_failure_counter(account: str):
    """What counts one account's failed token refreshes (``Runtime.token_failures``)."""
    from plural_cancel.worker import metrics

    failures = metrics.TOKEN_REFRESH_FAILURES.labels(account)  # shown at 0 from the start: rate() needs one
    return lambda exc: failures.inc()


class DuePump(bootsteps.StartStopStep):
    """Sends due cancels back to the queue, from every worker, a few times a second: deferred
    ones whose time has come, and live ones whose message was lost or whose lease ran out;
    then the callbacks of cancels that have ended. Before them, the accounts file is looked
    at (its changes are in force within ``RELOAD_INTERVAL``, ``config.accounts``).

    A bootstep on the worker's own timer rather than a beat job: cancels then come back
    within ``PUMP_INTERVAL`` of their due time even when beat is down. Several workers
    pumping at once is safe: each due cancel is taken atomically.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.tref = None

    def start(self, worker):
        skipped: dict[str, float] = {}  # step -> monotonic time of its last "skipped" line

        def skip(step, why: str) -> None:
            # Four ticks a second would each be a line (with a traceback, a Sentry event) for
            # as long as Redis is away: one line a step, then one a minute while it lasts.
            now = time.monotonic()
            if now - skipped.get(step.__name__, -SKIPPED_EVERY) >= SKIPPED_EVERY:
                skipped[step.__name__] = now
                log.warning("%s skipped: %s", step.__name__, why)

        def tick():
            for step in (refresh_accounts, pump, send_callbacks):  # one failing does not hold the others back
                try:
                    step(worker.app)
                except (*REDIS_AWAY, OperationalError) as exc:
                    skip(step, f"Redis unreachable ({type(exc).__name__})")
                except Exception as exc:  # anything else must not kill the timer either; the next tick retries
                    if write_refused(exc):
                        skip(step, f"Redis refuses writes ({refusal_code(exc)})")
                    else:
                        log.exception("%s failed", step.__name__)
                else:
                    if skipped.pop(step.__name__, None) is not None:
                        log.warning("%s runs again", step.__name__)

        self.tref = worker.timer.call_repeatedly(PUMP_INTERVAL, tick, priority=10)

    def stop(self, worker):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def _check_settings_under_celery(app: CancelApp) -> None:
    """Under the ``celery`` command, a bad setting stops start-up with one line, not a traceback.

    Checked at import because the celery command reads the app's configuration
    before any signal a handler could hook.
    """
    if os.path.basename(sys.argv[0]) != "celery":
        return
    try:
        settings = app.settings
        if _celery_command(sys.argv[1:]) == "worker":
            # The worker cannot work without accounts; beat, inspect, control and the rest
            # never call Plural (an operator's shell asks the workers with REDIS_URL alone).
            # Read here, so a bad accounts file stops start-up with its one line.
            if not app.runtime.book.accounts():
                settings.require_credentials()  # names the variable: no file, no PLURAL_CLIENT_ID
    except ConfigError as exc:
        sys.stderr.write(f"plural-cancel: configuration error: {exc}\n")
        raise SystemExit(2) from None


_CELERY_OPTIONS_WITH_VALUES = {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config",
                               "--workdir"}
"""The ``celery`` command's own options that take a value (as a separate argument)."""


def _celery_command(args: list[str]) -> str | None:
    """The sub-command of a ``celery`` command line (``worker``, ``beat``, ``inspect``...):
    its first argument that is neither an option nor an option's value, so that
    ``-A worker`` is never taken for it."""
    args = iter(args)
    for arg in args:
        if arg in _CELERY_OPTIONS_WITH_VALUES:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


app = CancelApp()
app.steps["worker"].add(DuePump)
app.steps["worker"].add(ClockWatch)
app.steps["worker"].add(WorkerHeartbeat)  # liveness and readiness files (plural_cancel.heartbeat)
app.steps["consumer"].add(BrokerReady)
_check_settings_under_celery(app)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_runtime(**kwargs):
    if app._runtime is not None:
        app._runtime.close()


# -- malformed messages: dropped by the transport or by Celery, counted fleet-wide ------
# A message without a usable request_id has no record to fail; the log line says what
# happened and the count in Redis is what `plural-cancel stats` and the metrics show.


def _count_malformed(client: redis.Redis, keys, reason: str) -> None:
    try:
        malformed.count(client, keys, reason)
    except redis.RedisError as exc:  # the drop itself is logged already; a blip must not add a traceback
        log.warning("malformed message not counted: redis unreachable (%s)", type(exc).__name__,
                    extra={"reason": reason})


@message_dropped.connect
def _count_dropped(sender=None, reason=None, client=None, **kwargs):
    """A queue item that was not a kombu message (``worker.broker`` logged it), counted in the
    broker's database (the product's), through the dropping channel's ``client``."""
    _count_malformed(client if client is not None else app.runtime.redis, app.runtime.keys, reason)


def _consumer_runtime(sender) -> Runtime:
    """The runtime of the app whose consumer sent a signal (the worker's own, in a worker)."""
    return getattr(sender, "app", app).runtime


@signals.task_rejected.connect
def _count_rejected(sender=None, **kwargs):
    """A kombu message that is not a Celery task message (Celery logged and discarded it)."""
    rt = _consumer_runtime(sender)
    _count_malformed(rt.redis, rt.keys, malformed.NOT_A_TASK_MESSAGE)


@signals.task_unknown.connect
def _count_unknown(sender=None, **kwargs):
    """A task message naming a task this worker does not have (Celery logged and discarded it)."""
    rt = _consumer_runtime(sender)
    _count_malformed(rt.redis, rt.keys, malformed.UNKNOWN_TASK)


# -- operations: logs, Sentry and metrics in the worker and beat processes --------------
# Their modules are imported inside the handlers: producers import this app too, and
# need neither sentry-sdk nor prometheus-client loaded.


@signals.setup_logging.connect
def _setup_logging(loglevel=None, logfile=None, **kwargs):
    """Worker and beat log through :mod:`worker.logs` (structured, redacted), not Celery's format."""
    from plural_cancel.worker import logs

    # The runtime's: it learns the secrets of accounts added to the file at run time.
    logs.configure(app.runtime.redactor, loglevel or logging.INFO, logfile)


@signals.celeryd_init.connect
@signals.beat_init.connect
def _start_reporting(**kwargs):
    """Sentry in the worker's main process (before its pool starts) and in beat; off without SENTRY_DSN."""
    from plural_cancel.worker import reporting

    reporting.init(app.settings, app.conf.beat_schedule, redactor=app.runtime.redactor)


@signals.worker_ready.connect
def _start_metrics(sender=None, **kwargs):
    """Serve Prometheus metrics from the worker's main process when ``METRICS_PORT`` is set.

    On ``worker_ready`` (sent just before "ready." is logged): logging is set up by then,
    so a port already in use is one structured line and one Sentry event. The threads
    pool runs every task in this one process, so its counters are the worker's. A
    prefork pool would count in children this server cannot see: then no server rather
    than wrong numbers.
    """
    from celery.concurrency.prefork import TaskPool as PreforkPool

    from plural_cancel.worker import metrics

    port = app.settings.metrics_port
    if not port:
        return
    if issubclass(sender.controller.pool_cls, PreforkPool):  # sender: the worker's consumer
        log.warning("METRICS_PORT is ignored under the prefork pool (its children count where the "
                    "metrics server cannot see); run the threads pool (the default) for metrics")
        return
    try:
        metrics.MetricsServer(port, lambda: metrics.snapshot(app.runtime)).start()
    except OSError as exc:  # cancels matter more than metrics: say so and carry on
        log.error("metrics: cannot listen on port %d (%s)", port, exc.strerror or exc)


@signals.worker_ready.connect
def _check_shutdown_mode(sender=None, **kwargs):
    """Say so when SIGTERM will not hand cancels back after ``WORKER_SHUTDOWN_GRACE``.

    Both conditions are outside the app's reach: billiard reads ``REMAP_SIGTERM`` from the
    environment when it is imported, and ``--pool`` on the command line overrides ours.
    """
    from billiard.common import REMAP_SIGTERM

    from plural_cancel.worker.pool import TaskPool

    if REMAP_SIGTERM != "SIGQUIT":
        log.warning("REMAP_SIGTERM is not SIGQUIT: SIGTERM is Celery's warm shutdown, which waits for "
                    "every cancel in flight instead of handing it back after WORKER_SHUTDOWN_GRACE "
                    "(set REMAP_SIGTERM=SIGQUIT in the worker's environment, as the Procfile does)")
    elif not issubclass(sender.controller.pool_cls, TaskPool):
        log.warning("the worker runs Celery's %s pool, not worker.pool:TaskPool: a soft shutdown cannot "
                    "hand back the cancels still in flight", sender.controller.pool_cls.__module__)
