"""The Celery app: one object, configured in one ``conf.update`` from the settings.

``celery -A worker worker`` and ``celery -A worker beat`` load it from the repo root.
Settings are read from the environment the first time the app is configured, so a
producer that imports ``tasks`` reads them once too; tests hand in their own with
:meth:`CancelApp.use`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import kombu.pools
from celery import Celery, bootsteps, signals

from config.celery import PUMP_INTERVAL, celery_config
from config.settings import ConfigError, Settings
from worker.runtime import Runtime

log = logging.getLogger(__name__)


class CancelApp(Celery):
    """A Celery app that carries the product's settings and its per-process runtime."""

    def __init__(self, settings: Settings | None = None, **kwargs):
        super().__init__("plural-cancel", include=["tasks.cancel", "tasks.periodic"], **kwargs)
        self._settings = settings
        self._runtime: Runtime | None = None
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
                    self._runtime = Runtime(self.settings)
        return self._runtime

    def use(self, settings: Settings, runtime: Runtime | None = None) -> None:
        """Switch to other settings (tests, the command line's overrides)."""
        if self._runtime is not None:
            self._runtime.close()
        self._settings = settings
        self._runtime = runtime
        self.conf.update(celery_config(settings))
        # Drop the broker pools built for the old settings: the app's own, the producer
        # pool it caches, and kombu's process-wide registries that producer pool came from.
        if self._pool is not None:
            self._pool.force_close_all()
            self._pool = None
        self.amqp._producer_pool = None
        kombu.pools.reset()


class DeferredPump(bootsteps.StartStopStep):
    """Moves due deferred cancels back to the queue, from every worker, a few times a second.

    A bootstep on the worker's own timer rather than a beat job: deferred cancels
    then come back within ``PUMP_INTERVAL`` of their due time even when beat is down.
    Several workers pumping at once is safe: each due cancel is taken atomically.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.tref = None

    def start(self, worker):
        from tasks.periodic import pump_deferred  # registered by the app's include list

        def tick():
            try:
                pump_deferred(worker.app)
            except Exception:  # a Redis blip must not kill the timer; the next tick retries
                log.exception("deferred pump failed")

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
        if "worker" in sys.argv[1:]:
            settings.require_credentials()  # beat never calls Plural; the worker cannot without them
    except ConfigError as exc:
        sys.stderr.write(f"plural-cancel: configuration error: {exc}\n")
        raise SystemExit(2) from None


app = CancelApp()
app.steps["worker"].add(DeferredPump)
_check_settings_under_celery(app)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_runtime(**kwargs):
    if app._runtime is not None:
        app._runtime.close()
