"""Celery settings derived from :class:`config.settings.Settings`, applied in one ``conf.update``.

The product relies on at-least-once delivery over the Redis transport:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only
  after the cancel has been recorded, so a worker that dies mid-cancel hands it back.
- ``worker_prefetch_multiplier = 1``: a worker holds no more messages than it has
  threads, so a dead worker strands as few as possible.
- ``visibility_timeout``: kombu re-delivers an unacknowledged message after this long.
  It must exceed the longest a cancel can legitimately run (:func:`lease_seconds`),
  and no ETA/countdown may ever be longer than it (we never use one: deferred cancels
  wait in Redis, see ``worker.ledger``), or a message is delivered twice.
- a queue of our own (``CANCEL_QUEUE``), never Celery's default ``celery``: a merchant's
  Celery app on the same Redis database keeps its queue and we keep ours. Nothing else
  of ours is shared with it either: kombu's unacknowledged-message bookkeeping (by
  default one ``unacked`` hash per database, swept by every app on its own visibility
  timeout, so ours, under a minute, would hand back a host's ETA task long before it is
  due: ``worker.broker`` keeps ours under ``plural-cancel:unacked``), and the
  remote-control and event exchanges (by default ``celery.pidbox`` and ``celeryev``: a
  host operator's ``celery control shutdown`` would stop our workers).
  No global key prefix: a service sending by name (``send_task(..., queue=...)``) must
  find the queue under its plain name.
- shutdown: the deployment sets ``REMAP_SIGTERM=SIGQUIT`` (Celery's own switch, read
  from the environment by billiard), so SIGTERM is Celery's soft shutdown: no new
  message is taken, cancels in flight get ``worker_soft_shutdown_timeout`` to finish,
  then every message still unacknowledged goes back to Redis at once
  (``worker.pool.TaskPool`` makes the threads pool able to do this).
- Redis restarts and failovers: workers and beat wait for Redis for as long as it is
  away, then carry on in the same process (``broker_connection_max_retries``,
  ``redbeat_redis_options``; ``worker.broker`` and ``worker.beat`` mend what no setting
  covers).
"""

from __future__ import annotations

from datetime import timedelta

from kombu import Exchange, Queue
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from plural_cancel.config import sentinel
from plural_cancel.config.settings import Settings

DEFAULT_CONCURRENCY = 128
"""Threads per worker process: a cancel spends nearly all its time waiting on Plural, so
threads busy = rate x the time a cancel holds one (the call, the wait for the GIL, the
consumer's turn to hand it the next message). Chosen by measurement (``bench/README.md``,
end to end; docs/scaling.md)."""

CANCEL_TASK = "tasks.cancel_payment_link"
"""The cancel task's registered name: producers in any language send it by this name."""

RESTORE_INTERVAL = 5
"""Seconds between kombu's sweeps for unacknowledged messages past the visibility timeout."""

PUMP_INTERVAL = 0.25
"""Seconds between moves of due cancels back to the queue (each worker): deferred ones
whose time has come, and those whose message was lost or whose lease ran out."""

BACKLOG_AHEAD = 2.0
"""Seconds of work at the rate limit kept ahead of the workers (queued, running, or due by
then) while bulk cancels wait in the ledger's backlog: a pump tick (``PUMP_INTERVAL``)
never finds the fleet idle, and the broker holds seconds of messages, not a clean-up."""

CALLBACK_LEASE = 10.0
"""Seconds a callback taken for sending is held: one whose sender did not confirm it (it
died, or Redis failed) by then is sent again, with the same task id."""

FIRE_INTERVAL = 1.0
"""Seconds between runs of the scheduled-cancel firer (beat): a scheduled cancel fires
within about this long of its time."""

FIRE_EXPIRES = 10.0
"""Seconds after which a firer message no worker took is dropped: while workers are
down, beat's messages must not pile up (the next one fires everything due anyway)."""

LEASE_MARGIN = 5.0
"""Seconds a lease lasts past its attempt's own bound: the two Redis round trips around
the call, and a thread waiting for the GIL."""

BEAT_REDIS_BACKOFF_CAP = 5.0
"""Largest wait, in seconds, between beat's attempts to reach Redis while it is away: beat
carries on within about this long of Redis coming back."""


def lease_seconds(settings: Settings) -> float:
    """How long one delivery holds a cancel, in seconds: the attempt's whole bound
    (``CANCEL_ATTEMPT_TIMEOUT``: rate-limit wait, token, PUT and GET, each call cut short
    at the attempt's deadline) plus :data:`LEASE_MARGIN`."""
    return settings.attempt_timeout + LEASE_MARGIN


def visibility_timeout(settings: Settings) -> int:
    """Seconds before kombu re-delivers an unacknowledged message; longer than any lease."""
    return int(lease_seconds(settings) + 10)


def celery_config(settings: Settings) -> dict:
    """The whole Celery configuration, for one ``app.conf.update``."""
    queue = settings.cancel_queue
    transport_options = {
        "visibility_timeout": visibility_timeout(settings),
        "unacked_restore_interval": RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 25,
    }
    config = {
        "broker_url": settings.redis_url,
        "broker_transport": "plural_cancel.worker.broker:Transport",  # kombu's Redis transport, cheaper per message
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # Celery's default gives up after 100 attempts (some 50 minutes) and the worker
        # exits; a worker is of no use without Redis, so it waits for it, however long.
        "broker_connection_max_retries": None,
        "result_backend": None,
        "task_ignore_result": True,  # results live in the ledger, where producers read them
        "task_serializer": "json",
        "accept_content": ["json"],
        # The one queue, as Celery would build it from task_default_queue, declared so that
        # it is the only one: the worker consumes it alone, and no send can add one that it
        # would consume after a reconnect. Every task of ours takes the default queue, so no
        # task_routes (which, set here, would also recurse: Celery reads the routes back on update).
        "task_default_queue": queue,
        "task_queues": (Queue(queue, Exchange(queue, "direct"), routing_key=queue),),
        "task_create_missing_queues": False,
        "control_exchange": queue,  # remote control: "<queue>.pidbox", not the "celery.pidbox" every app shares
        "event_exchange": f"{queue}.ev",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_track_started": False,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "plural_cancel.worker.pool:TaskPool",
        "worker_concurrency": DEFAULT_CONCURRENCY,
        "worker_soft_shutdown_timeout": settings.shutdown_grace,
        # Pinned before Celery 6 turns it on: on a lost broker connection it would "cancel"
        # the cancels in flight, which a thread cannot be (worker.pool.TaskPool would then
        # stop waiting for its threads at the next shutdown). Each records its own answer
        # instead; a message whose ack cannot reach Redis comes back after the visibility
        # timeout, and the ledger skips it.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_enable_soft_shutdown_on_idle": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_disable_rate_limits": True,  # our limiter is global (worker.ratelimit); Celery's is per worker
        "broker_pool_limit": DEFAULT_CONCURRENCY + 4,
        "enable_utc": True,
        "timezone": "UTC",
        # Beat on RedBeat: two beat processes may run for availability; a lock in
        # Redis lets only one of them fire.
        "beat_scheduler": "plural_cancel.worker.beat:Scheduler",  # RedBeat's, taking its lock again after a failover
        "redbeat_redis_url": settings.redis_url,
        # Passed to RedBeat's redis-py client. It retries every command, pipeline and lock
        # script through a connection error for as long as Redis is away (retries=-1), so
        # a restart pauses beat instead of ending it. OSError too: redis-py retries a
        # refused connect only for the errors named here, and by default not that one.
        # RedBeat's own ``retry_period`` is not enough: it wraps only the client's direct
        # commands, and a tick starts by extending the lock through a Lock object.
        "redbeat_redis_options": {
            "retry": Retry(ExponentialWithJitterBackoff(base=0.5, cap=BEAT_REDIS_BACKOFF_CAP), -1,
                           supported_errors=(RedisConnectionError, RedisTimeoutError, OSError)),
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 25,
        },
        "redbeat_key_prefix": "plural-cancel:redbeat",
        "redbeat_lock_timeout": 30,
        "beat_max_loop_interval": 5,
        "beat_schedule": {
            "fire-schedules": {"task": "tasks.fire_schedules", "schedule": timedelta(seconds=FIRE_INTERVAL),
                               "options": {"expires": FIRE_EXPIRES}},
        },
    }
    if settings.redis_sentinels:
        # The same transport over kombu's Sentinel channel, and RedBeat's Sentinel branch
        # (config.sentinel); the options above still apply to the master's connections.
        config["broker_url"] = sentinel.broker_url(settings)
        config["broker_transport"] = "plural_cancel.worker.broker:SentinelTransport"
        transport_options.update(sentinel.broker_transport_options(settings))
        config["redbeat_redis_url"] = sentinel.redbeat_url(settings)
        config["redbeat_redis_options"].update(sentinel.redbeat_options(settings))
    return config
