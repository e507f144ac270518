"""The worker's bootsteps that keep its heartbeat file (``plural_cancel.heartbeat``): the
file from the worker's start to its stop, and whether it is connected to the broker with
its event loop turning."""

from __future__ import annotations

from celery import bootsteps

from plural_cancel.heartbeat import HEARTBEAT_INTERVAL, WORKER, Heartbeat, heartbeat_path


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Worker blueprint: the heartbeat, from the worker's start (before it connects) to its stop.

    Its own thread, not the worker's timer: with Redis the timer is the event loop's,
    which does not turn while the consumer waits for Redis.
    """

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        worker.heartbeat = None

    def start(self, worker):
        path = heartbeat_path(worker.app.settings.health_dir, WORKER)
        worker.heartbeat = Heartbeat(path, connected=False, loop_at=None).start()

    def stop(self, worker):
        if worker.heartbeat is not None:
            worker.heartbeat.update(connected=False)
            worker.heartbeat.stop()


class BrokerReady(bootsteps.StartStopStep):
    """Consumer blueprint: marks the worker connected once it consumes, and disconnected when
    the consumer stops or restarts (a lost connection restarts it: ``Consumer.start``).

    While connected, a mark on the event loop's timer says the loop turns.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.tref = None

    def start(self, c):
        heartbeat = getattr(c.controller, "heartbeat", None)
        if heartbeat is None:
            return

        def turned():
            heartbeat.note(loop_at=heartbeat.clock())

        heartbeat.update(connected=True, loop_at=heartbeat.clock())
        self.tref = c.timer.call_repeatedly(HEARTBEAT_INTERVAL, turned, priority=10)

    def stop(self, c):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        heartbeat = getattr(c.controller, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.update(connected=False)

    shutdown = stop
