"""Beat's scheduler: RedBeat's, which takes its lock again when Redis has lost it.

RedBeat lets one beat fire while others wait on a lock in Redis, extended at every
tick. Its Redis client retries connection errors for as long as Redis is away
(``redbeat_redis_options`` in ``config.celery``), so a restart or failover only pauses
beat. But when Redis comes back without the lock (away longer than
``redbeat_lock_timeout``, or a failover to a replica that never saw it), RedBeat's tick
raises ``LockNotOwnedError`` and the beat process ends; nothing in RedBeat or Celery
takes the lock again. :class:`Scheduler` waits for it as at start-up instead, so two
beats keep their rule: the one that holds the lock fires, the other waits.

It also keeps beat's heartbeat file (``worker.health``): written by a thread of its own
from the scheduler's creation, which beat does before it waits for the lock or for
Redis, so a standby beat and one waiting for Redis are live; each finished tick is
noted in it, so only a beat that fires is ready.

Used through Celery's ``beat_scheduler`` setting.
"""

from __future__ import annotations

import logging

from redbeat import RedBeatScheduler
from redbeat.schedulers import get_redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, LockNotOwnedError, TimeoutError
from redis.retry import Retry

from plural_cancel.worker.health import BEAT, Heartbeat, heartbeat_path

log = logging.getLogger(__name__)


class Scheduler(RedBeatScheduler):
    """``redbeat.RedBeatScheduler`` that takes its lock again after Redis lost it, with a heartbeat."""

    def __init__(self, app, *args, **kwargs):
        # Before RedBeat's own set-up, which waits for Redis.
        self.heartbeat = Heartbeat(heartbeat_path(app.settings.health_dir, BEAT), ticked_at=None).start()
        super().__init__(app, *args, **kwargs)

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
        get_redis(self.app).set_retry(Retry(NoBackoff(), 1))
        try:
            super().close()
        except (ConnectionError, TimeoutError) as exc:
            log.warning("beat: could not release the lock (%s); it expires by itself", exc)
