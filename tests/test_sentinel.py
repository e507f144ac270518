"""Redis Sentinel: one setting (``REDIS_SENTINELS``, ``REDIS_SENTINEL_MASTER``) points the
broker, RedBeat and the product's own clients at the master the Sentinels name, and the
same worker and beat processes follow it through failovers: a ``SENTINEL FAILOVER`` and
a master killed with SIGKILL, mid-run."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest
import redis

from plural_cancel.config.celery import celery_config
from plural_cancel.config.settings import Settings
from plural_cancel.errors import ConfigError
from tests.conftest import use_settings, wait_for
from tests.support.redis_server import free_port
from tests.support.sentinel import SentinelGroup
from tests.support.workers import CeleryProcess, service_env, start_beat, start_worker

SENTINELS = {"REDIS_SENTINELS": "127.0.0.1:26379,10.0.0.2:26380", "REDIS_SENTINEL_MASTER": "m"}

REDIS_URL = "redis:///0"
"""With Sentinels, ``REDIS_URL`` gives only the database (and credentials): no host."""


# -- the one setting, as each client takes it ----------------------------------------------

def test_sentinels_are_read_as_host_port_pairs_with_their_master():
    settings = Settings.from_env({**SENTINELS, "REDIS_URL": "redis://:s3cret@ignored:6379/2"})
    assert settings.redis_sentinels == (("127.0.0.1", 26379), ("10.0.0.2", 26380))
    assert settings.redis_sentinel_master == "m"
    assert settings.describe()["redis_sentinels"] == "127.0.0.1:26379,10.0.0.2:26380"
    assert Settings.from_env({"REDIS_SENTINELS": "[::1]:26379", "REDIS_SENTINEL_MASTER": "m"}).redis_sentinels \
        == (("::1", 26379),)
    assert Settings.from_env({}).redis_sentinels == ()


@pytest.mark.parametrize("env, variable", [
    ({"REDIS_SENTINELS": "127.0.0.1:26379"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINELS": "127.0.0.1", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "127.0.0.1:26379,:1", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "h:70000", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({**SENTINELS, "REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER"),
    ({**SENTINELS, "REDIS_URL": "rediss://h:6380/0"}, "REDIS_URL"),
])
def test_a_bad_sentinel_setting_is_named(env, variable):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable


def test_without_sentinels_the_broker_and_beat_take_redis_url_as_before():
    config = celery_config(Settings.from_env({"REDIS_URL": "redis://h:6379/3"}))
    assert config["broker_url"] == config["redbeat_redis_url"] == "redis://h:6379/3"
    assert config["broker_transport"] == "plural_cancel.worker.broker:Transport"
    assert "master_name" not in config["broker_transport_options"]
    assert "sentinels" not in config["redbeat_redis_options"]


def test_with_sentinels_the_broker_beat_and_clients_take_the_same_master():
    settings = Settings.from_env({**SENTINELS, "REDIS_URL": "redis://:p@ss@x/3"})
    config = celery_config(settings)
    assert config["broker_url"] == "sentinel://:p%40ss@127.0.0.1:26379/3;sentinel://:p%40ss@10.0.0.2:26380/3"
    assert config["broker_transport"] == "plural_cancel.worker.broker:SentinelTransport"
    assert config["broker_transport_options"]["master_name"] == "m"
    assert config["broker_transport_options"]["visibility_timeout"] == celery_config(Settings())[
        "broker_transport_options"]["visibility_timeout"]
    assert config["redbeat_redis_url"].startswith("redis-sentinel://")
    options = config["redbeat_redis_options"]
    assert (options["sentinels"], options["service_name"], options["db"], options["password"]) == \
        ([("127.0.0.1", 26379), ("10.0.0.2", 26380)], "m", 3, "p@ss")

    from plural_cancel.worker.runtime import Runtime
    client = Runtime(settings).redis
    pool = client.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == ("m", 3, "p@ss")
    assert pool.connection_kwargs["socket_timeout"] == 10
    client.close()


def test_the_broker_channel_is_ours_over_kombus_sentinel_channel():
    from kombu.transport.redis import SentinelChannel as KombuSentinelChannel

    from plural_cancel.worker.broker import Channel, SentinelChannel, SentinelTransport

    assert SentinelTransport.Channel is SentinelChannel
    assert SentinelChannel.__mro__[1:3] == (Channel, KombuSentinelChannel)
    # Ours before kombu's: the drops, refused writes, _get_pool's guard and our unacked keys.
    for name in ("_brpop_read", "_get", "decode_body", "_create_client", "_get_pool", "QoS", "unacked_key"):
        assert getattr(SentinelChannel, name) is getattr(Channel, name), name
    assert "master_name" in SentinelChannel.from_transport_options


def test_redbeats_sentinel_clients_get_the_endless_retry():
    """A guard on RedBeat's internals (``worker.beat.follow_sentinel``): its Sentinel branch
    passes none of ``redbeat_redis_options``' connection options to its clients."""
    from redbeat.schedulers import get_redis

    from plural_cancel.worker import app as product_app
    from plural_cancel.worker.beat import follow_sentinel

    app = type(product_app)(Settings.from_env({**SENTINELS, "REDIS_URL": "redis://:pw@x/2"}))  # an app of its own
    app.conf.update(celery_config(app.settings))
    assert get_redis(app).get_retry() is None  # RedBeat alone: no retry, beat ends at a failover
    follow_sentinel(app)
    client = get_redis(app)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.service_name == "m"
    assert client.get_retry()._retries == -1
    assert (kwargs["socket_connect_timeout"], kwargs["socket_keepalive"], kwargs["health_check_interval"]) == \
        (5, True, 25)
    assert (kwargs["db"], kwargs["password"], kwargs["decode_responses"]) == (2, "pw", True)


def test_a_worker_no_sentinel_answers_says_so_in_one_short_line(services):
    """Celery logs why it cannot connect on every attempt: redis-py's text held each Sentinel
    client's repr (867 characters a line). Now one short line naming REDIS_SENTINELS and the
    master, never REDIS_URL's host (unused under Sentinel)."""
    port = free_port()  # nothing listens there
    env = service_env("redis://:s3cret@10.255.0.1:6390/0", "http://127.0.0.1:1/api",
                      REDIS_SENTINELS=f"127.0.0.1:{port}", REDIS_SENTINEL_MASTER="mymaster")
    worker = CeleryProcess("worker", env, ["--loglevel=INFO", "--without-mingle", "--without-gossip",
                                           "-n", f"w{time.monotonic_ns()}@%h"])
    services.append(worker)

    def attempts() -> list[str]:
        return [json.loads(line)["message"] for line in worker.log().splitlines() if "Cannot connect" in line]

    lines = wait_for(lambda: attempts()[1:] and attempts(), timeout=30, message="two attempts to connect")
    said = (f"none of the Sentinels in REDIS_SENTINELS (127.0.0.1:{port}) answered (Connection refused): "
            "no master 'mymaster' (REDIS_SENTINEL_MASTER) found")
    for line in lines:
        assert said in line and len(line) < 300, line
        assert "10.255.0.1" not in line and "s3cret" not in line


# -- failovers with real workers and beat --------------------------------------------------

CANCELS = 500
LIMIT = 20
"""Cancels per second to the sandbox: 500 cancels take about 25 s when nothing breaks."""

QUICK_RECOVERY = {"PLURAL_CONNECT_TIMEOUT": 1, "PLURAL_READ_TIMEOUT": 4, "CANCEL_STALL_TIMEOUT": 5}
"""As in test_redis_restart: an 11-s attempt (a 16-s lease) and a 5-s stall timeout."""


@pytest.fixture
def sentinel_group():
    group = SentinelGroup()
    yield group
    group.stop()


def states(app, request_ids) -> list[tuple[str, str] | None]:
    """(state, outcome) of each cancel; ``[]`` while this process's connections follow the master."""
    try:
        return [s and (s["state"], s["outcome"]) for s in app.runtime.ledger.statuses(request_ids)]
    except redis.ConnectionError:
        return []


def done(app, request_ids) -> int:
    return sum(1 for s in states(app, request_ids) if s and s[0] in ("succeeded", "failed"))


def exits(processes) -> list[str]:
    return [f"celery {p.kind} exited {p.proc.returncode}:\n{p.log()[-3000:]}"
            for p in processes if p.proc.poll() is not None]


def first_put_after(sandbox, at: float) -> float:
    return min((r["timestamp"] for r in sandbox.requests() if r["method"] == "PUT" and r["timestamp"] > at),
               default=float("nan")) - at


@pytest.mark.slow
def test_workers_and_beat_follow_the_master_through_failovers(sentinel_group, healthy_sandbox, services, capsys):
    from plural_cancel.tasks import enqueue_many

    group, sandbox = sentinel_group, healthy_sandbox
    settings = {"PLURAL_RATE_LIMIT": LIMIT, **QUICK_RECOVERY, **group.env}
    env = service_env(REDIS_URL, sandbox.url, **settings)
    services.extend([start_worker(env, concurrency=16) for _ in range(2)] + [start_beat(env)])
    pids = [p.proc.pid for p in services]
    app = use_settings(REDIS_URL, sandbox.url, **settings)
    links = sandbox.create_links(CANCELS, status="CREATED", prefix="pl-sentinel-")
    started_at = time.time()
    request_ids = enqueue_many(links, app=app)
    wait_for(lambda: done(app, request_ids) >= CANCELS // 5, 30, 0.1, "a fifth of the cancels done")

    failed_over_at, done_at_failover = time.time(), done(app, request_ids)
    group.failover()
    # The demoted master rejoins as a replica (Sentinel reconfigures it at its next INFO,
    # ~10 s); only then can the next failover find a replica to promote.
    group.wait_replica_linked(40)
    assert not exits(services), "\n".join(exits(services))

    killed_at, done_at_kill = time.time(), done(app, request_ids)
    assert done_at_kill < CANCELS, "every cancel ended before the master was killed: nothing was mid-run"
    group.kill_master()
    elected_at = time.time()

    def all_ended():
        if exits(services):
            return "exited"
        found = states(app, request_ids)
        return len(found) == CANCELS and all(s and s[0] == "succeeded" for s in found) and "done"

    try:
        outcome = wait_for(all_ended, 60, 0.5, f"{CANCELS} cancels succeeded")
    except AssertionError:
        left = [(rid, s) for rid, s in zip(request_ids, states(app, request_ids)) if not s or s[0] != "succeeded"]
        raise AssertionError(f"{len(left)} cancels not succeeded, e.g. {left[:5]}") from None
    finished_at = time.time()
    assert outcome == "done", "\n".join(exits(services))
    assert [p.proc.pid for p in services] == pids
    assert {s[1] for s in states(app, request_ids)} <= {"cancelled", "already_cancelled"}

    # The cancel's Request-ID is its PUT's (a GET after a refused PUT sends one of its own: tasks.cancel).
    seen = defaultdict(set)  # link -> the Request-IDs of the cancels Plural saw for it
    puts = defaultdict(int)
    for entry in sandbox.requests():
        if entry["method"] == "PUT":
            seen[entry["link_id"]].add(entry["request_id"])
            puts[entry["link_id"]] += 1
    by_link = dict(zip(links, request_ids))
    assert all(seen[link] == {by_link[link]} for link in links), \
        [(link, seen[link]) for link in links if seen[link] != {by_link[link]}][:5]

    beat = services[-1].log()
    assert beat.rindex("Sending due task") > beat.index("beat: Starting")
    wait_for(lambda: "Sending due task" in services[-1].log()[len(beat):], 10, 0.2, "beat firing after the kill")
    with capsys.disabled():
        print(f"\n[sentinel] {CANCELS} cancels at {LIMIT}/s; SENTINEL FAILOVER at {failed_over_at - started_at:.1f}s "
              f"({done_at_failover} done), first PUT {first_put_after(sandbox, failed_over_at):.1f}s after; "
              f"master SIGKILLed at {killed_at - started_at:.1f}s ({done_at_kill} done), new master in "
              f"{elected_at - killed_at:.1f}s, first PUT {first_put_after(sandbox, elected_at):.1f}s after; "
              f"all succeeded {finished_at - started_at:.1f}s after enqueue; links PUT more than once "
              f"(same Request-ID): {sum(n > 1 for n in puts.values())}; "
              f"already_cancelled: {sum(s[1] == 'already_cancelled' for s in states(app, request_ids))}")


# -- REDIS_WAIT_REPLICAS: an enqueue returns once a replica holds its records ---------------

@pytest.fixture
def master_and_replica():
    from tests.support.redis_server import RedisServer

    master = RedisServer(prefix="pc-wait-master-")
    replica = RedisServer(prefix="pc-wait-replica-", args=("--replicaof", "127.0.0.1", str(master.port)))
    wait_for(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up", 10, 0.1,
             "the replica linked")
    yield master, replica
    replica.proc.send_signal(18)  # SIGCONT, if a test stopped it
    replica.stop()
    master.stop()


def test_an_enqueue_waits_for_a_replica_and_says_when_none_acknowledged(master_and_replica):
    import signal

    from plural_cancel.errors import NotReplicated
    from plural_cancel.tasks import enqueue_cancel, enqueue_many

    master, replica = master_and_replica
    app = use_settings(master.url, REDIS_WAIT_REPLICAS=1)
    [request_id] = enqueue_many(["pl-wait-1"], app=app)
    assert redis.Redis(port=replica.port).exists(app.runtime.keys.record(request_id))

    replica.proc.send_signal(signal.SIGSTOP)  # up, but acknowledging nothing
    started = time.monotonic()
    with pytest.raises(NotReplicated, match=r"0 of 1 replicas .*REDIS_WAIT_REPLICAS=1"):
        enqueue_cancel("pl-wait-2", request_id="rid-wait-2", app=app)
    assert 0.9 < time.monotonic() - started < 5
    assert app.runtime.ledger.status("rid-wait-2")["state"] == "queued"  # on the master; enqueue again to be sure
    replica.proc.send_signal(signal.SIGCONT)
    assert enqueue_cancel("pl-wait-2", request_id="rid-wait-2", app=app) == "rid-wait-2"


# -- REDIS_WAIT_REPLICAS=auto through a failover: no enqueue that returned is lost -----------

@pytest.mark.slow
@pytest.mark.parametrize("wait", ["auto"])
def test_no_enqueue_that_returned_is_lost_in_a_failover(sentinel_group, wait, capsys):
    """Two producers at about 60 enqueues/s in all, ``SENTINEL FAILOVER`` mid-run: the old
    master takes writes until Sentinel demotes it (~10 s) and then throws them away. A
    producer retries what raised (the same Request-ID); every Request-ID an enqueue
    returned must be on the master in the end. (With ``wait="0"``, 100 of 908 were lost here.)"""
    import threading

    from plural_cancel.tasks import enqueue_cancel

    group = sentinel_group
    settings = {**group.env, "REDIS_WAIT_REPLICAS": wait}
    stop = threading.Event()
    accepted: list[list[str]] = [[], []]
    refused = [0, 0]

    def produce(n: int) -> None:
        app = use_settings(REDIS_URL, **settings)
        i = 0
        while not stop.is_set():
            request_id = f"fo-{n}-{i}"
            try:
                enqueue_cancel(f"pl-fo-{n}-{i}", request_id=request_id, app=app)
            except redis.RedisError:  # NotReplicated, a connection cut, READONLY: call again
                refused[n] += 1
                stop.wait(0.05)
                continue
            accepted[n].append(request_id)
            i += 1
            stop.wait(1 / 30)
        app.close()

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        old = group.master_port()
        before = sum(map(len, accepted))
        new = group.failover()
        group.wait_replica_linked(40)  # the old master demoted: what it took since is gone now
        after = sum(map(len, accepted))
        time.sleep(3)  # and the producers go on writing to the new master and its replica
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    ids = [rid for ids in accepted for rid in ids]
    with redis.Redis(port=new) as master:
        pipe = master.pipeline(transaction=False)
        for rid in ids:
            pipe.exists(f"plural-cancel:req:{rid}")
        lost = [rid for rid, found in zip(ids, pipe.execute()) if not found]
    with capsys.disabled():
        print(f"\n[failover] REDIS_WAIT_REPLICAS={wait}: {len(ids)} enqueues returned ({before} before the "
              f"failover of {old} to {new}), {sum(refused)} raised and were called again, {len(lost)} lost")
    assert len(ids) > after + 60, "the producers did not go on after the failover"
    assert not lost, f"{len(lost)} enqueues returned and then lost, e.g. {lost[:5]}"
