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
    from tasks import get_status

    return wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed") and s,
                    timeout, message=f"cancel {request_id} ended")


def runs(system, key="hostapp:ran") -> list[dict]:
    return [json.loads(item) for item in system["redis"].lrange(key, 0, -1)]


def test_host_tasks_run_on_the_host_worker_and_cancels_on_ours(system):
    from tasks import enqueue_cancel

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

