"""Never lose a cancel: whatever happens to its message, every live record is carried to an end.

One real worker (one thread, so a second message waits in the queue while the first
runs), a real sandbox, and a real Redis that the tests make lose messages, refuse
writes and refuse scripts. The worker authenticates as its own ACL user so that a
test can take rights from the worker alone.
"""

from __future__ import annotations

import time

import pytest
import redis

from plural_cancel.config.settings import Settings
from tests.conftest import use_settings, wait_for
from tests.support.workers import service_env, start_worker

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)

TERMINAL = ("succeeded", "failed")
STALL = 3
USER, PASSWORD = "pc-worker", "pc-worker-pw"


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    admin = redis.Redis.from_url(module_redis_url)
    admin.acl_setuser(USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
                      commands=["+@all"])
    host, db = module_redis_url.split("://", 1)[1].rsplit("/", 1)
    worker_url = f"redis://{USER}:{PASSWORD}@{host}/{db}"
    timing = {"CANCEL_STALL_TIMEOUT": STALL, "PLURAL_CONNECT_TIMEOUT": 1, "PLURAL_READ_TIMEOUT": 4,
              "LIMITER_MAX_WAIT": 0.5, "CANCEL_ATTEMPT_TIMEOUT": 6, "CANCEL_RETRY_BASE": 0.2,
              "CANCEL_RETRY_CAP": 1, "PLURAL_RATE_LIMIT": 50}
    env = service_env(worker_url, sandbox_process.url, **timing)
    worker = start_worker(env, concurrency=1)
    app = use_settings(module_redis_url, sandbox_process.url, **timing)
    yield {"app": app, "sandbox": sandbox_process, "worker": worker, "admin": admin}
    worker.stop()
    admin.config_set("maxmemory", 0)
    admin.acl_deluser(USER)
    admin.close()


def status(app, request_id):
    from plural_cancel.tasks import get_status

    return get_status(request_id, app=app)


def finished(app, request_id, timeout=30.0):
    return wait_for(lambda: (s := status(app, request_id)) and s["state"] in TERMINAL and s, timeout, 0.1,
                    message=f"cancel {request_id} terminal")


def puts_for(sandbox, link_id):
    return [r for r in sandbox.requests() if r["method"] == "PUT" and r.get("link_id") == link_id]


def busy_worker(system, prefix):
    """The worker's one thread held by a 3-s call; returns (running id, queued id, their links)."""
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox, admin = system["app"], system["sandbox"], system["admin"]
    links = sandbox.create_links(2, prefix=prefix)
    sandbox.set_faults(latency_ms=3000)
    running = enqueue_cancel(links[0], app=app)
    # Busy once its PUT is at the sandbox ("running" comes earlier, at the claim; a delivery
    # that then gives its rate-limit slot up as late frees the thread at once).
    wait_for(lambda: puts_for(sandbox, links[0]), 20, 0.02, message="first cancel's PUT at the sandbox")
    waiting = enqueue_cancel(links[1], app=app)
    assert admin.llen(QUEUE) == 1  # the second message waits: the worker's one thread is busy
    return running, waiting, links


def test_a_message_deleted_from_the_queue_is_sent_again(system):
    app, sandbox, admin, worker = system["app"], system["sandbox"], system["admin"], system["worker"]
    running, lost, links = busy_worker(system, "pl-deleted-")
    admin.delete(QUEUE)  # the message vanishes (an operator's mistake, a failover...)
    sandbox.reset_faults()
    assert finished(app, running)["outcome"] == "cancelled"
    result = finished(app, lost, timeout=STALL + 15)
    assert (result["state"], result["outcome"]) == ("succeeded", "cancelled")
    assert [p["request_id"] for p in puts_for(sandbox, links[1])] == [lost]
    assert worker.proc.poll() is None


def test_redis_refusing_writes_around_a_delivery_loses_nothing_and_stops_no_worker(system):
    """maxmemory reached mid-run: the running cancel cannot record its answer, and the next
    delivery cannot be held for acknowledgement (kombu's second step after BRPOP)."""
    app, sandbox, admin, worker = system["app"], system["sandbox"], system["admin"], system["worker"]
    running, popped, links = busy_worker(system, "pl-oom-")
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # every write is refused from now on
    try:
        wait_for(lambda: "a delivered message was lost" in worker.log(), 15, message="the lost delivery logged")
        assert admin.llen(QUEUE) == 0  # popped, and held nowhere: only the ledger knows of it
        assert status(app, running)["state"] == "running"  # its answer could not be written
    finally:
        admin.config_set("maxmemory", 0)
        sandbox.reset_faults()
    for request_id, link_id in zip((running, popped), links):
        result = finished(app, request_id, timeout=30)
        assert result["state"] == "succeeded" and result["outcome"] in ("cancelled", "already_cancelled")
        assert {p["request_id"] for p in puts_for(sandbox, link_id)} == {request_id}
        assert sandbox.link(link_id)["cancel_count"] == 1
    assert worker.proc.poll() is None and "Unrecoverable error" not in worker.log()


def test_an_exception_before_the_claim_loses_nothing(system):
    """The worker's Redis user may not run scripts for a while: the task fails before its claim,
    and Celery acknowledges the message; the record is still carried to its end."""
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox, admin, worker = system["app"], system["sandbox"], system["admin"], system["worker"]
    [link_id] = sandbox.create_links(1, prefix="pl-noperm-")
    admin.acl_setuser(USER, enabled=True, commands=["-@scripting"])
    try:
        request_id = enqueue_cancel(link_id, app=app)
        wait_for(lambda: "NoPermissionError" in worker.log(), 10, message="the task failing before its claim")
        assert admin.llen(QUEUE) == 0  # taken, failed, acknowledged (task_acks_on_failure_or_timeout)
        assert status(app, request_id)["state"] == "queued"
    finally:
        admin.acl_setuser(USER, enabled=True, commands=["+@all"])
    result = finished(app, request_id, timeout=STALL + 15)
    assert (result["state"], result["outcome"]) == ("succeeded", "cancelled")
    assert [p["request_id"] for p in puts_for(sandbox, link_id)] == [request_id]
    assert worker.proc.poll() is None


@pytest.mark.parametrize("kwargs, problem", [
    ({"payment_link_id": "pl-extra-1", "request_id": "malformed-extra", "reason": "expired"},
     "unknown arguments: reason"),
    ({"payment_link_id": 12345, "request_id": "malformed-int-link"}, "payment_link_id: must be a string"),
    ({"request_id": "malformed-no-link"}, "payment_link_id: missing"),
])
def test_a_malformed_message_with_a_usable_request_id_ends_rejected(system, kwargs, problem):
    app = system["app"]
    app.send_task("tasks.cancel_payment_link", kwargs=kwargs)
    result = finished(app, kwargs["request_id"], timeout=10)
    assert (result["state"], result["outcome"]) == ("failed", "rejected")
    assert result["last_error"]["code"] == "MALFORMED_MESSAGE" and problem in result["last_error"]["message"]
    assert "12345" not in result["last_error"]["message"]  # values are never echoed
    assert system["worker"].proc.poll() is None


def test_a_malformed_message_without_a_usable_request_id_is_counted(system):
    from plural_cancel.worker import malformed

    app, admin = system["app"], system["admin"]
    before = malformed.counts(admin, app.runtime.keys)[malformed.BAD_ARGUMENTS]
    app.send_task("tasks.cancel_payment_link", kwargs={"payment_link_id": "pl-no-request-id"})
    app.send_task("tasks.cancel_payment_link", args=["pl-bad-request-id", "has space"])
    wait_for(lambda: malformed.counts(admin, app.runtime.keys)[malformed.BAD_ARGUMENTS] == before + 2, 10,
             message="both counted")
    assert system["worker"].proc.poll() is None


def test_a_malformed_message_never_takes_the_request_id_of_a_scheduled_cancel(system):
    """A message sent by name with a bad link id and the Request-ID a schedule holds: it is
    counted as malformed, and the scheduled cancel still fires and is sent under its id."""
    from datetime import datetime, timedelta, timezone

    from plural_cancel.tasks import get_schedule, schedule_cancel, unschedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules
    from plural_cancel.worker import malformed

    app, sandbox, admin = system["app"], system["sandbox"], system["admin"]
    [link_id] = sandbox.create_links(1, prefix="pl-sched-n2-")
    schedule_cancel(link_id, datetime.now(timezone.utc) + timedelta(seconds=2), request_id="order-77-expiry", app=app)
    before = malformed.counts(admin, app.runtime.keys)[malformed.BAD_ARGUMENTS]
    app.send_task("tasks.cancel_payment_link", kwargs={"payment_link_id": 77, "request_id": "order-77-expiry"},
                  queue=QUEUE)
    wait_for(lambda: malformed.counts(admin, app.runtime.keys)[malformed.BAD_ARGUMENTS] == before + 1, 10,
             message="the message counted as malformed")
    assert status(app, "order-77-expiry") is None
    assert get_schedule(link_id, app=app)["state"] == "scheduled"
    wait_for(lambda: fire_schedules(app), 10, 0.2, message="the scheduled cancel fired")
    assert get_schedule(link_id, app=app)["result"] == "enqueued"
    assert unschedule_cancel(link_id, app=app) is False  # it fired: too late, and rightly so
    result = finished(app, "order-77-expiry")
    assert (result["state"], result["outcome"]) == ("succeeded", "cancelled")
    assert [p["request_id"] for p in puts_for(sandbox, link_id)] == ["order-77-expiry"]


def test_a_follower_whose_leader_vanished_is_sent_under_its_own_request_id(system):
    """The leader's record is deleted (by hand, a pattern delete) while its follower waits:
    within the stall timeout the follower leads, and the link is cancelled under its id."""
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox, admin = system["app"], system["sandbox"], system["admin"]
    [link_id] = sandbox.create_links(1, prefix="pl-orphan-")
    keys = app.runtime.keys
    app.runtime.ledger.create_many([("leader-gone", link_id)])  # recorded; its message never sent
    follower = enqueue_cancel(link_id, app=app)
    assert status(app, follower)["follows"] == "leader-gone"
    admin.delete(keys.record("leader-gone"), keys.followers("leader-gone"))  # plural-cancel:*leader-gone*
    result = finished(app, follower, timeout=STALL + 20)
    assert (result["state"], result["outcome"], result["follows"]) == ("succeeded", "cancelled", None)
    assert [p["request_id"] for p in puts_for(sandbox, link_id)] == [follower]


# -- Redis refusing writes for want of replicas (min-replicas-to-write) ----------------------

def test_a_master_refusing_writes_for_want_of_replicas_stops_no_worker(sandbox_process, services):
    """``min-replicas-to-write 1`` (Redis's own remedy for a failover's lost writes) and the
    replica gone: every write, the broker's BRPOP among them, is refused with NOREPLICAS. The
    worker rides it out as it does a demoted master or maxmemory, and carries on once the
    replica is back."""
    from plural_cancel.tasks import enqueue_cancel
    from tests.support.redis_server import RedisServer

    quick = ("--repl-diskless-sync-delay", "0")
    master = RedisServer(prefix="pc-norepl-master-", args=quick)
    replicas = []

    def replica():
        server = RedisServer(prefix="pc-norepl-replica-", args=("--replicaof", "127.0.0.1", str(master.port)))
        replicas.append(server)
        wait_for(lambda: redis.Redis(port=master.port).info("replication")["connected_slaves"] == 1, 10, 0.05,
                 message="the replica linked")
        return server

    try:
        admin = redis.Redis(port=master.port)
        first = replica()
        admin.config_set("min-replicas-to-write", 1)
        admin.config_set("min-replicas-max-lag", 10)
        timing = {"CANCEL_STALL_TIMEOUT": STALL, "PLURAL_RATE_LIMIT": 50}
        worker = start_worker(service_env(master.url, sandbox_process.url, **timing), concurrency=2)
        services.append(worker)
        app = use_settings(master.url, sandbox_process.url, **timing)
        links = sandbox_process.create_links(2, prefix="pl-norepl-")
        assert finished(app, enqueue_cancel(links[0], app=app))["outcome"] == "cancelled"

        first.stop()
        wait_for(lambda: "NOREPLICAS" in str(_write_error(admin)), 10, 0.1, message="writes refused")
        time.sleep(3)  # the worker's BRPOPs are refused meanwhile
        assert worker.proc.poll() is None, worker.log()[-3000:]
        replica()
        wait_for(lambda: _write_error(admin) is None, 10, 0.1, message="writes taken again")  # a good replica
        request_id = enqueue_cancel(links[1], app=app)
        assert finished(app, request_id)["outcome"] == "cancelled"
        assert worker.proc.poll() is None and "Unrecoverable error" not in worker.log()
        log = worker.log()
        assert log.count("no message is taken until") == 1, log[-3000:]  # once per refusal, not per BRPOP
        # A step of the pump's tick that meets the refusal says so once a minute, not four times a second.
        for step in ("refresh_accounts", "pump", "send_callbacks"):
            assert log.count(f"{step} skipped: Redis refuses writes") <= 1, log[-3000:]
        assert " failed" not in log.replace("cancel failed", ""), log[-3000:]  # no step's traceback either
    finally:
        for server in replicas:
            server.stop()
        master.stop()


def _write_error(client) -> Exception | None:
    try:
        client.set("plural-cancel:probe", "1")
    except redis.ResponseError as exc:
        return exc
    return None
