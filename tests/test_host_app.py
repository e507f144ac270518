"""A merchant's own Celery app and ours on one Redis database, each with its own worker.

The host app (written below into a temporary folder, as a merchant's project would hold
it) has its own tasks on Celery's default queue ``celery``; ours travel on
``plural-cancel``. Every host task must run on the host's worker, every cancel on ours,
and neither worker may ever receive (and log as unregistered) the other's messages,
nor re-deliver them, nor answer the other's remote-control broadcasts.
"""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest
import redis
from celery import Celery

from tests.conftest import use_settings, wait_for
from tests.support.scripts import claim
from tests.support.workers import CeleryProcess, service_env, start_worker

HOST_APP = textwrap.dedent('''
    """A merchant's Celery app: its own tasks, Celery's defaults (queue ``celery``)."""
    import json
    import os

    import redis
    from celery import Celery

    app = Celery("hostapp", broker=os.environ["HOST_BROKER_URL"])
    app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    runs = redis.Redis.from_url(os.environ["HOST_BROKER_URL"])


    @app.task(name="orders.expire_order", bind=True)
    def expire_order(self, order_id):
        runs.rpush("hostapp:ran", json.dumps({"order_id": order_id, "id": self.request.id,
                                              "hostname": self.request.hostname}))


    @app.task(name="orders.on_cancel_outcome", bind=True)
    def on_cancel_outcome(self, status):
        runs.rpush("hostapp:outcomes", json.dumps({"status": status, "id": self.request.id,
                                                   "queue": self.request.delivery_info.get("routing_key"),
                                                   "hostname": self.request.hostname}))
''')

ETA_COUNTDOWN = 25.0
"""Seconds: longer than our worker's visibility timeout here (17 s, see ``system``) plus a
restore sweep, so a worker of ours that swept the host's unacknowledged messages would
hand the host's ETA task back to its queue before it is due (and it would run twice)."""


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostapp")
    (folder / "hostapp.py").write_text(HOST_APP)
    # Attempts bounded at 2.5 s: our visibility timeout is then 17 s (config.celery), short
    # enough for the test to outwait it.
    env = service_env(module_redis_url, sandbox_process.url, LIMITER_MAX_WAIT="0.5", PLURAL_CONNECT_TIMEOUT="0.5",
                      PLURAL_READ_TIMEOUT="1.5", CANCEL_ATTEMPT_TIMEOUT="2.5")
    ours = start_worker(env, concurrency=4, hostname="ours@%h")
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("PLURAL_", "CANCEL_", "SENTRY_"))}
    host_env.update({"HOST_BROKER_URL": module_redis_url, "PYTHONPATH": str(folder), "PYTHONUNBUFFERED": "1"})
    host = CeleryProcess("worker", host_env, ["-Q", "celery,orders", "--pool=threads", "--concurrency=4",
                                              "-n", "host@%h", "--without-mingle", "--without-gossip",
                                              "--loglevel=INFO"], app="hostapp", cwd=folder).wait_ready()
    # The host's own producer side, as its web process would send: no code of ours imported.
    client = Celery("hostapp", broker=module_redis_url)
    app = use_settings(module_redis_url, sandbox_process.url)
    yield {"app": app, "sandbox": sandbox_process, "ours": ours, "host": host, "host_client": client,
           "redis": redis.Redis.from_url(module_redis_url, decode_responses=True)}
    client.close()
    host.stop()
    ours.stop()


def finished(app, request_id, timeout=30.0):
    from plural_cancel.tasks import get_status

    return wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed") and s,
                    timeout, message=f"cancel {request_id} ended")


def runs(system, key="hostapp:ran") -> list[dict]:
    return [json.loads(item) for item in system["redis"].lrange(key, 0, -1)]


def test_host_tasks_run_on_the_host_worker_and_cancels_on_ours(system):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox, host = system["app"], system["sandbox"], system["host_client"]
    eta_sent = time.monotonic()
    host.send_task("orders.expire_order", args=["order-eta"], countdown=ETA_COUNTDOWN)
    orders = [host.send_task("orders.expire_order", args=[f"order-{i}"]).id for i in range(20)]
    links = sandbox.create_links(20, status="CREATED", prefix="pl-host-")
    request_ids = [enqueue_cancel(link, app=app) for link in links[:10]]
    for link in links[10:]:  # the host sends cancels by name, without our code
        host.send_task("tasks.cancel_payment_link", kwargs={"payment_link_id": link, "request_id": f"by-host-{link}"},
                       queue="plural-cancel")
        request_ids.append(f"by-host-{link}")

    for request_id in request_ids:
        assert finished(app, request_id)["outcome"] == "cancelled"
    wait_for(lambda: len(runs(system)) >= 20, 30, message="the host's 20 tasks run")

    # Remote control stays on each side too: a host operator's broadcast reaches only the host's workers.
    assert {name.split("@")[0] for reply in host.control.ping(timeout=1.0) for name in reply} == {"host"}
    assert {name.split("@")[0] for reply in app.control.ping(timeout=1.0) for name in reply} == {"ours"}

    # The ETA task waits unacknowledged in the host's worker for longer than our visibility timeout.
    time.sleep(max(0.0, ETA_COUNTDOWN + 4 - (time.monotonic() - eta_sent)))
    ran = runs(system)
    assert sorted(r["id"] for r in ran if r["order_id"] != "order-eta") == sorted(orders)  # each once
    assert [r["order_id"] for r in ran].count("order-eta") == 1
    assert {r["hostname"].split("@")[0] for r in ran} == {"host"}
    for worker in (system["ours"], system["host"]):
        log = worker.log()
        assert "unregistered task" not in log.lower() and "Received unregistered" not in log, worker.log_path
    assert system["redis"].llen("celery") == 0
    assert system["redis"].llen("plural-cancel") == 0


def test_the_worker_consumes_only_the_cancel_queue(system):
    """Our worker's queues, as its own remote control reports them."""
    replies = system["app"].control.inspect(timeout=1.0).active_queues() or {}
    assert [[q["name"] for q in queues] for queues in replies.values()] == [["plural-cancel"]]


# -- callbacks: the host app hears how its cancel ended, without polling ------------------

def outcomes_for(system, request_id) -> list[dict]:
    return [o for o in runs(system, "hostapp:outcomes") if o["status"]["request_id"] == request_id]


def called_back(system, request_id, timeout=20.0) -> dict:
    """The one callback the host app ran for ``request_id`` (waiting a moment for any second)."""
    wait_for(lambda: outcomes_for(system, request_id), timeout, 0.05, f"the callback of {request_id}")
    time.sleep(1.0)  # several pump ticks: a second copy would have arrived
    [outcome] = outcomes_for(system, request_id)
    assert outcome["queue"] == "orders" and outcome["hostname"].startswith("host@")
    return outcome


def test_a_paid_link_is_told_to_the_host_app_once_by_its_callback(system):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="PROCESSED", prefix="pl-paid-")
    request_id = enqueue_cancel(link_id, request_id="order-77-expiry", callback="orders.on_cancel_outcome",
                                callback_queue="orders", app=app)
    status = called_back(system, request_id)["status"]
    assert (status["state"], status["outcome"], status["link_status"]) == ("failed", "not_cancellable", "PROCESSED")
    assert status == finished(app, request_id)  # the status record, as get_status returns it
    # The same Request-ID enqueued again is the same cancel: no second callback.
    enqueue_cancel(link_id, request_id=request_id, callback="orders.on_cancel_outcome", callback_queue="orders",
                   app=app)
    time.sleep(1.0)
    assert len(outcomes_for(system, request_id)) == 1
    assert system["redis"].zcard("plural-cancel:callbacks") == 0


def test_followers_and_bulk_cancels_call_back_each_under_its_own_id(system):
    from plural_cancel.tasks import enqueue_cancel, enqueue_many, get_status

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="CREATED", prefix="pl-cb-twice-")
    many = sandbox.create_links(3, status="CREATED", prefix="pl-cb-many-")
    callback = {"callback": "orders.on_cancel_outcome", "callback_queue": "orders"}
    sandbox.set_faults(latency_ms=1200)
    try:
        leader = enqueue_cancel(link_id, app=app)  # no callback of its own
        wait_for(lambda: get_status(leader, app=app)["state"] == "running", 10, 0.02, message="leader running")
        follower = enqueue_cancel(link_id, **callback, app=app)
        bulk = enqueue_many(many, **callback, app=app)
        assert get_status(follower, app=app)["follows"] == leader
        status = called_back(system, follower)["status"]
    finally:
        sandbox.reset_faults()
    assert (status["state"], status["outcome"], status["follows"]) == ("succeeded", "cancelled", leader)
    assert outcomes_for(system, leader) == []
    for request_id in bulk:
        assert called_back(system, request_id)["status"]["outcome"] == "cancelled"


def test_a_callback_left_unsent_by_a_dead_worker_is_sent_by_another(system):
    """A worker ended the cancel in the ledger and died before sending its callback: the
    pending entry, written in the same script as the end, is sent by any live worker."""
    app = system["app"]
    ledger, attempts = app.runtime.ledger, app.runtime.attempts
    from plural_cancel.worker.ledger import Callback

    assert ledger.create_many([("died-before-callback", "pl-cb-dead")],
                              callback=Callback("orders.on_cancel_outcome", "orders")) == [1]
    assert claim(ledger, "died-before-callback", "pl-cb-dead", "a-worker-that-died", lease=30).verdict == "claimed"
    attempts.finish("died-before-callback", "pl-cb-dead", "a-worker-that-died", state="succeeded",
                    outcome="already_cancelled", attempted=True, link_status="CANCELLED")
    status = called_back(system, "died-before-callback")["status"]
    assert (status["outcome"], status["link_status"]) == ("already_cancelled", "CANCELLED")


@pytest.mark.parametrize("options, field", [
    ({"callback": "orders.on_cancel_outcome"}, "callback_queue"),
    ({"callback_queue": "orders"}, "callback"),
    ({"callback": "orders on cancel", "callback_queue": "orders"}, "callback"),
    ({"callback": "x" * 201, "callback_queue": "orders"}, "callback"),
    ({"callback": "orders.on_cancel_outcome", "callback_queue": "orders/1"}, "callback_queue"),
    ({"callback": "orders.on_cancel_outcome", "callback_queue": "plural-cancel"}, "callback_queue"),
])
def test_a_bad_callback_is_refused_naming_the_field_and_nothing_is_written(system, options, field):
    from plural_cancel.tasks import enqueue_cancel, enqueue_many

    client = system["redis"]
    before = client.exists("plural-cancel:req:bad-callback"), client.llen("plural-cancel")
    with pytest.raises(ValueError, match=field):
        enqueue_cancel("pl-cb-bad", request_id="bad-callback", **options, app=system["app"])
    with pytest.raises(ValueError, match=field):
        enqueue_many(["pl-cb-bad"], **options, app=system["app"])
    assert (client.exists("plural-cancel:req:bad-callback"), client.llen("plural-cancel")) == before


def raw_cancel_message(payment_link_id: str, request_id: str, message_id: str, queue: str = "plural-cancel") -> str:
    """The message docs/using.md gives for a service in another language: LPUSH it onto the queue."""
    import base64

    body = [[], {"payment_link_id": payment_link_id, "request_id": request_id},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "tasks.cancel_payment_link", "id": message_id, "root_id": message_id,
                    "parent_id": None, "group": None},
        "properties": {"correlation_id": message_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": message_id},
    })


def test_a_message_pushed_by_a_service_in_another_language_is_a_cancel(system):
    """No Celery on the sending side: one LPUSH of docs/using.md's JSON, then HGETALL of the record."""
    import uuid

    [link_id] = system["sandbox"].create_links(1, status="CREATED", prefix="pl-raw-")
    system["redis"].lpush("plural-cancel", raw_cancel_message(link_id, f"raw-{link_id}", str(uuid.uuid4())))
    record = wait_for(lambda: (r := system["redis"].hgetall(f"plural-cancel:req:raw-{link_id}"))
                      and r["state"] == "succeeded" and r, 20, 0.1, "the record succeeded")
    assert (record["outcome"], record["link_status"], record["payment_link_id"]) == ("cancelled", "CANCELLED", link_id)
    assert "unregistered" not in system["ours"].log().lower()
