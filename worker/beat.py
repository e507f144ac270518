"""Beat's scheduler: RedBeat's, which takes its lock again when Redis has lost it.

RedBeat lets one beat fire while others wait on a lock in Redis, extended at every
tick. Its Redis client retries connection errors for as long as Redis is away
(``redbeat_redis_options`` in ``config.celery``), so a restart or failover only pauses
beat. But when Redis comes back without the lock (away longer than
``redbeat_lock_timeout``, or a failover to a replica that never saw it), RedBeat's tick
raises ``LockNotOwnedError`` and the beat process ends; nothing in RedBeat or Celery
takes the lock again. :class:`Scheduler` waits for it as at start-up instead, so two
beats keep their rule: the one that holds the lock fires, the other waits.

It also keeps beat's heartbeat file (``plural_cancel.heartbeat``): written by a thread of its own
from the scheduler's creation, which beat does before it waits for the lock or for
Redis, so a standby beat and one waiting for Redis are live; each finished tick is
noted in it, so only a beat that fires is ready.

Through Redis Sentinel (``REDIS_SENTINELS``), RedBeat builds its client from the
Sentinels but passes it none of ``redbeat_redis_options``' connection options, the
endless ``retry`` among them: :func:`follow_sentinel` hands them over, or beat would end
at the first failover.

Used through Celery's ``beat_scheduler`` setting.
"""

from __future__ import annotations

import logging

from redbeat import RedBeatScheduler
from redbeat.schedulers import REDBEAT_INTERNAL_OPTIONS, REDBEAT_SENTINEL_KEY, get_redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, LockNotOwnedError, TimeoutError
from redis.retry import Retry

from plural_cancel.heartbeat import BEAT, Heartbeat, heartbeat_path

log = logging.getLogger(__name__)


class Scheduler(RedBeatScheduler):
    """``redbeat.RedBeatScheduler`` that takes its lock again after Redis lost it, with a heartbeat."""

    def __init__(self, app, *args, lazy: bool = False, **kwargs):
        self.heartbeat = Heartbeat(heartbeat_path(app.settings.health_dir, BEAT), ticked_at=None)
        # Started before RedBeat's own set-up, which waits for Redis. Not by the scheduler that
        # beat's banner builds (``lazy``) only to describe it and never runs: its heartbeat
        # would rewrite the file beside the real one's, with no tick in it.
        if not lazy:
            self.heartbeat.start()
        follow_sentinel(app)
        super().__init__(app, *args, lazy=lazy, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        """One pass of the schedule; returns the seconds to sleep before the next."""
        try:
            interval = super().tick(*args, **kwargs)
        except LockNotOwnedError:
            # Another beat may hold the lock by now, and then it fires; this one waits,
            # as at start-up, every ``beat_max_loop_interval`` seconds.
            log.warning("beat: the lock was lost while Redis was away; waiting to hold it again")
            self.heartbeat.update(ticked_at=None)
            self.lock.acquire()
            log.info("beat: Acquired lock")
            return 0.0
        self.heartbeat.note(ticked_at=self.heartbeat.clock())
        return interval

    def close(self) -> None:
        self.heartbeat.stop()
        # Releasing the lock on the way out is a courtesy (it expires by itself): one try,
        # not the endless retries of the ticks, so a beat stopped while Redis is away stops.
        once = Retry(NoBackoff(), 1)
        get_redis(self.app).set_retry(once)
        if self.lock is not None:  # through Sentinel, get_redis builds a new client each call: not the lock's
            self.lock.redis.set_retry(once)
        try:
            super().close()
        except (ConnectionError, TimeoutError) as exc:
            log.warning("beat: could not release the lock (%s); it expires by itself", exc)


def follow_sentinel(app) -> None:
    """Give RedBeat's Sentinel-built clients the connection options of ``redbeat_redis_options``
    (the endless ``retry``, timeouts, keepalive, health checks), which its Sentinel branch
    does not pass on; nothing to do without Sentinel, where it passes them all."""
    get_redis(app)  # builds RedBeat's Sentinel (no connection yet) when configured for one
    manager = getattr(app, REDBEAT_SENTINEL_KEY, None)
    if manager is None:
        return
    # RedBeat builds every client with ``manager.master_for`` (a new one per call), which
    # takes the Sentinel's connection_kwargs; a guard in tests/test_sentinel.py checks they arrive.
    options = {key: value for key, value in app.conf.redbeat_redis_options.items()
               if key not in REDBEAT_INTERNAL_OPTIONS and key not in manager.connection_kwargs}
    manager.connection_kwargs.update(options)
