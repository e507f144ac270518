"""A producer's writes held until a replica has them (``REDIS_WAIT_REPLICAS``).

A failover promotes a replica; what the old master acknowledged and had not yet sent
it is gone. The workers' own lost writes heal (the due index sends a live cancel again),
but a producer's new record does not: its call returned a Request-ID, and nothing in
Redis knows of it any more. So a producer's writes (enqueue, ``enqueue_many``, schedule,
unschedule, a dead letter retried) end with Redis's ``WAIT``, in the same pipeline, on
the connection that made them: the call returns once a replica holds them.

- ``auto`` (the default): wait for one replica whenever the master has one connected,
  or had one less than ``REPLICA_GRACE`` seconds ago as this process saw it. The grace
  is what keeps a failover safe: the old master loses its replica the moment Sentinel
  promotes it, and goes on taking writes (which the demotion then throws away) for about
  10 s; a write there must fail, not go through. With no replica connected for longer
  (a Redis that has none, or a replica down for good) there is nothing to wait for: the
  write goes through, is counted (``Keys.unreplicated``, read by ``stats`` and the
  metrics) and warned about, once a minute across the fleet, when a replica is expected:
  under Sentinel, or on a master that had one within the last hour (Redis keeps its
  replication backlog that long after the last replica left). A Redis that never had a
  replica has no failover to lose writes in: it is counted, not warned about. Which case
  holds is read from ``ROLE`` at the end of every write's pipeline, so it costs no round
  trip of its own.
- a number N: wait for N replicas, whatever is connected.
- 0: never wait.

When fewer replicas than asked acknowledge within ``WAIT_TIMEOUT_MS``, the call raises
:class:`~plural_cancel.errors.NotReplicated`: the master has the write, a failover now
could lose it, and the same call again (same Request-IDs) is safe.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis

from plural_cancel.config.settings import WAIT_AUTO
from plural_cancel.errors import NotReplicated
from plural_cancel.worker.keys import Keys

log = logging.getLogger(__name__)

WAIT_TIMEOUT_MS = 1000
"""Milliseconds a write waits for its replicas (Redis ``WAIT``): a replica answers within
a round trip, so one that has not in a second is away or resyncing."""

REPLICA_GRACE = 30.0
"""Seconds after a master was last seen with a replica during which ``auto`` still waits
for one (and fails the write when none acknowledges): longer than a failover's window
of writes to the demoted master (about 10 s, ``docs``), short enough that a replica
down for good stops failing writes within a minute."""

WARN_EVERY = 60
"""Seconds between two warnings, fleet-wide, that producers' writes have no replica."""


class ReplicaWait:
    """Ends a producer's pipelines with ``WAIT``, as ``REDIS_WAIT_REPLICAS`` says (module doc).

    Use: ``token = wait.extend(pipe)`` before ``pipe.execute()``, then
    ``wait.check(replies, token)``, which strips the replies it added and raises
    :class:`NotReplicated` when the write is not on enough replicas.
    """

    def __init__(self, client: redis.Redis, setting: int | str, *, keys: Keys = Keys(),
                 clock: Callable[[], float] = time.monotonic, sentinel: bool = False):
        self.redis = client
        self.setting = setting
        self.keys = keys
        self.clock = clock
        self.sentinel = sentinel
        """Redis is found through Sentinels: its master is meant to have a replica."""
        self._connected: int | None = None
        """Replicas the master had connected at the end of the last write (``auto``); None: not known yet."""
        self._seen_at: float | None = None
        """``clock()`` when a replica was last seen connected (``auto``)."""

    def extend(self, pipe: Any) -> tuple[int, bool]:
        """Append this write's ``WAIT`` (and, for ``auto``, ``ROLE``) to ``pipe``; returns what
        :meth:`check` needs: (replicas asked for, whether ``ROLE`` follows)."""
        if self.setting == WAIT_AUTO:
            if self._connected is None:
                self._saw(replicas_connected(self.redis.execute_command("ROLE")))
            wanted = 1 if self._replicated() else 0
            if wanted:
                pipe.execute_command("WAIT", wanted, WAIT_TIMEOUT_MS)
            else:
                # Counted before it is known: no round trip of its own in the usual case.
                pipe.hincrby(self.keys.unreplicated, "writes", 1)
            pipe.execute_command("ROLE")
            return wanted, True
        if self.setting:
            pipe.execute_command("WAIT", self.setting, WAIT_TIMEOUT_MS)
        return int(self.setting), False

    def check(self, replies: list, token: tuple[int, bool]) -> list:
        """``replies`` without the ones :meth:`extend` added; raises :class:`NotReplicated`
        when fewer replicas than asked acknowledged the write."""
        wanted, role = token
        if not wanted and not role:
            return replies
        if role:
            connected = self._saw(replicas_connected(replies.pop()))
        acknowledged = replies.pop()
        if not wanted:
            # ``auto`` with no replica known: counted already (the HINCRBY's reply is
            # ``acknowledged`` here). A replica that has connected since may lack the write.
            if connected:
                self._confirm_late(connected)
            else:
                self._warn()
            return replies
        if acknowledged >= wanted:
            return replies
        if role and not self._replicated():
            # No replica for longer than the grace: nothing to wait for, as with none.
            self.redis.hincrby(self.keys.unreplicated, "writes", 1)
            self._warn()
            return replies
        asked = WAIT_AUTO if role else self.setting
        raise NotReplicated(f"{acknowledged} of {wanted} replicas acknowledged the write within {WAIT_TIMEOUT_MS} "
                            f"ms (REDIS_WAIT_REPLICAS={asked}): it is on the master, and a failover now could "
                            "lose it; call again (the same Request-IDs are one cancel)")

    def _saw(self, connected: int) -> int:
        self._connected = connected
        if connected:
            self._seen_at = self.clock()
        return connected

    def _replicated(self) -> bool:
        """Whether ``auto`` waits: a replica is connected, or was less than ``REPLICA_GRACE`` ago."""
        if self._connected:
            return True
        return self._seen_at is not None and self.clock() - self._seen_at < REPLICA_GRACE

    def _confirm_late(self, connected: int) -> None:
        # Replication keeps the master's order: a replica that holds a later write holds this
        # one too. So a write made now, on any connection, and WAIT for it, tell.
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.replication_mark, "1", px=60_000)
        pipe.execute_command("WAIT", 1, WAIT_TIMEOUT_MS)
        _, acknowledged = pipe.execute()
        if acknowledged >= 1:
            self.redis.hincrby(self.keys.unreplicated, "writes", -1)
            return
        raise NotReplicated(f"0 of 1 replicas acknowledged the write within {WAIT_TIMEOUT_MS} ms "
                            f"(REDIS_WAIT_REPLICAS=auto; {connected} connected just now): it is on the master, "
                            "and a failover now could lose it; call again (the same Request-IDs are one cancel)")

    def _warn(self) -> None:
        # Once a minute for the whole fleet (a key with a TTL): every producer process, the
        # command line's among them, would otherwise say it at its first write.
        if not self.redis.set(self.keys.unreplicated_warned, "1", nx=True, ex=WARN_EVERY):
            return
        if not self.sentinel and not self.redis.info("replication").get("repl_backlog_active"):
            return  # never had a replica (or not for an hour): no failover to lose writes in
        log.warning("Redis's master has no replica connected: producers' writes go through held by the master "
                    "alone, and a failover would lose them (%d so far: plural-cancel stats; "
                    "REDIS_WAIT_REPLICAS=auto)", unreplicated_writes(self.redis, self.keys))


def replicas_connected(role: Any) -> int:
    """Replicas connected to a master, from its ``ROLE`` reply (0 when it is not a master)."""
    if not role or (role[0] if isinstance(role[0], str) else role[0].decode()) != "master":
        return 0
    return len(role[2])


def unreplicated_writes(client: redis.Redis, keys: Keys = Keys()) -> int:
    """Producer writes that went through with no replica connected (``auto``), fleet-wide."""
    return int(client.hget(keys.unreplicated, "writes") or 0)
