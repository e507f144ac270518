"""``REDIS_WAIT_REPLICAS``: a producer's writes return once a replica holds them.

Against real redis-servers: a master with a replica streaming from it, a replica stopped
(connected, acknowledging nothing), killed (gone) and started again. The failover itself,
with Sentinels and two producers, is in ``test_sentinel``.
"""

from __future__ import annotations

import logging
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

from plural_cancel.errors import NotReplicated
from plural_cancel.worker import replication
from tests.conftest import use_settings, wait_for
from tests.support.redis_server import RedisServer

QUICK = ("--repl-diskless-sync-delay", "0")
"""No 5-s wait before the first sync of a replica."""


def linked(replica: RedisServer, master: RedisServer) -> bool:
    """Linked on both sides: the master lists a replica only once it has put it online,
    a moment after the replica reports its link up; and the replica acknowledges a write
    (one still busy loading, on a loaded machine, let the product's 1-s WAIT run out)."""
    client = redis.Redis(port=master.port)
    if not (redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up"
            and replication.replicas_connected(client.execute_command("ROLE")) > 0):
        return False
    client.set("test:replica-warm", "1")
    return client.execute_command("WAIT", 1, 5000) >= 1


@pytest.fixture
def master():
    server = RedisServer(prefix="pc-repl-master-", args=QUICK)
    yield server
    server.stop()


@pytest.fixture
def replica(master):
    server = RedisServer(prefix="pc-repl-replica-", args=("--replicaof", "127.0.0.1", str(master.port)))
    wait_for(lambda: linked(server, master), 10, 0.05, "the replica linked")
    yield server
    server.proc.send_signal(signal.SIGCONT)  # if a test stopped it
    server.stop()


def on_replica(replica: RedisServer, key: str) -> bool:
    return bool(redis.Redis(port=replica.port).exists(key))


def test_auto_is_the_default_and_every_producer_write_waits_for_the_replica(master, replica):
    from plural_cancel.tasks import enqueue_cancel, enqueue_many, schedule_cancel, unschedule_cancel

    app = use_settings(master.url)
    assert app.settings.wait_replicas == "auto"
    keys = app.runtime.keys
    # Each call returns once the replica holds what it wrote: read from the replica at once.
    request_id = enqueue_cancel("pl-repl-1", app=app)
    assert on_replica(replica, keys.record(request_id))
    [many] = enqueue_many(["pl-repl-2"], app=app)
    assert on_replica(replica, keys.record(many))
    schedule_cancel("pl-repl-3", datetime.now(timezone.utc) + timedelta(hours=1), app=app)
    assert on_replica(replica, keys.scheduled("pl-repl-3"))
    assert unschedule_cancel("pl-repl-3", app=app)
    assert not on_replica(replica, keys.scheduled("pl-repl-3"))
    assert replication.unreplicated_writes(redis.Redis(port=master.port), keys) == 0


@pytest.mark.parametrize("call", ["enqueue", "schedule", "unschedule"])
def test_a_replica_that_acknowledges_nothing_fails_the_write_in_about_a_second(master, replica, call):
    from plural_cancel.tasks import enqueue_cancel, schedule_cancel, unschedule_cancel

    app = use_settings(master.url)
    at = datetime.now(timezone.utc) + timedelta(hours=1)
    schedule_cancel("pl-stopped-s", at, app=app)
    replica.proc.send_signal(signal.SIGSTOP)  # connected, but acknowledging nothing
    started = time.monotonic()
    with pytest.raises(NotReplicated, match=r"0 of 1 replicas .*REDIS_WAIT_REPLICAS=auto"):
        {"enqueue": lambda: enqueue_cancel("pl-stopped", request_id="rid-stopped", app=app),
         "schedule": lambda: schedule_cancel("pl-stopped-2", at, app=app),
         "unschedule": lambda: unschedule_cancel("pl-stopped-s", app=app)}[call]()
    assert 0.9 < time.monotonic() - started < 5
    replica.proc.send_signal(signal.SIGCONT)
    if call == "enqueue":  # the same call again is safe: the same Request-ID is one cancel
        assert enqueue_cancel("pl-stopped", request_id="rid-stopped", app=app) == "rid-stopped"
        assert on_replica(replica, app.runtime.keys.record("rid-stopped"))


def test_a_master_that_never_had_a_replica_takes_writes_counted_not_warned(master, caplog):
    """A standalone Redis has no failover to lose writes in: nothing waits, nothing is said."""
    from plural_cancel.tasks import enqueue_cancel, enqueue_many

    app = use_settings(master.url)
    with caplog.at_level(logging.WARNING, logger="plural_cancel.worker.replication"):
        started = time.monotonic()
        for n in range(5):
            enqueue_cancel(f"pl-alone-{n}", app=app)
        enqueue_many(["pl-alone-a", "pl-alone-b"], app=app)
        assert time.monotonic() - started < 1  # nothing waited for a replica that is not there
    assert replication.unreplicated_writes(app.runtime.redis, app.runtime.keys) == 6
    assert caplog.records == []


def test_zero_never_waits_and_counts_nothing(master, replica):
    from plural_cancel.tasks import enqueue_cancel

    app = use_settings(master.url, REDIS_WAIT_REPLICAS=0)
    replica.proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    enqueue_cancel("pl-zero", app=app)
    assert time.monotonic() - started < 0.5
    assert replication.unreplicated_writes(app.runtime.redis, app.runtime.keys) == 0


def test_a_replica_gone_fails_writes_for_the_grace_then_lets_them_through_warned(master, replica, caplog):
    """The old master of a failover loses its replica at once and takes writes for ~10 s
    more: within the grace they must fail, not go through and be thrown away. After it, a
    replica down for good: writes go through, counted, and warned about once a minute
    for the whole fleet."""
    from plural_cancel.tasks import enqueue_cancel

    now = [1000.0]
    app = use_settings(master.url)
    app.runtime.replicas.clock = lambda: now[0]
    enqueue_cancel("pl-gone-1", app=app)  # seen with its replica
    replica.stop()
    wait_for(lambda: redis.Redis(port=master.port).info("replication")["connected_slaves"] == 0, 10, 0.05,
             "the master without its replica")
    now[0] += replication.REPLICA_GRACE - 1
    with pytest.raises(NotReplicated):
        enqueue_cancel("pl-gone-2", app=app)
    now[0] += 2  # past the grace: a replica down for good no longer fails every write
    with caplog.at_level(logging.WARNING, logger="plural_cancel.worker.replication"):
        enqueue_cancel("pl-gone-3", app=app)
        other = use_settings(master.url)  # another producer process, the same minute
        enqueue_cancel("pl-gone-4", app=other)
        enqueue_cancel("pl-gone-5", app=other)
    assert replication.unreplicated_writes(app.runtime.redis, app.runtime.keys) == 3
    [warning] = [r.getMessage() for r in caplog.records]
    assert "no replica connected" in warning and "1 so far" in warning


def test_a_replica_that_connects_during_a_write_is_waited_for(master):
    """The process knew no replica (no WAIT in its pipeline); the ROLE at the pipeline's end
    shows one: a second write on any connection, and WAIT for it, shows the replica holds both."""
    from plural_cancel.tasks import enqueue_cancel

    app = use_settings(master.url)
    enqueue_cancel("pl-late-0", app=app)  # known: no replica
    assert replication.unreplicated_writes(app.runtime.redis, app.runtime.keys) == 1
    server = RedisServer(prefix="pc-repl-late-", args=("--replicaof", "127.0.0.1", str(master.port)))
    try:
        wait_for(lambda: linked(server, master), 10, 0.05, "the replica linked")
        request_id = enqueue_cancel("pl-late-1", app=app)
        assert on_replica(server, app.runtime.keys.record(request_id))
        assert replication.unreplicated_writes(app.runtime.redis, app.runtime.keys) == 1  # not counted
        enqueue_cancel("pl-late-2", app=app)  # now known: waited for in the same pipeline
        assert replication.unreplicated_writes(app.runtime.redis, app.runtime.keys) == 1
    finally:
        server.stop()


def test_a_bad_setting_is_named():
    from plural_cancel.config.settings import Settings
    from plural_cancel.errors import ConfigError

    for value in ("-1", "17", "always", "1.5"):
        with pytest.raises(ConfigError, match="REDIS_WAIT_REPLICAS: must be auto, or an integer from 0 to 16"):
            Settings.from_env({"REDIS_WAIT_REPLICAS": value})
    assert Settings.from_env({"REDIS_WAIT_REPLICAS": "AUTO"}).wait_replicas == "auto"
    assert Settings.from_env({"REDIS_WAIT_REPLICAS": "2"}).wait_replicas == 2
