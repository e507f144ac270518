"""Celery's remote control against our worker: ``celery -A worker inspect ping|active``, and
task events turned on at run time, as Flower does.

Run as an operator runs them, ``.venv/bin/celery`` in a subprocess, against a real worker
on our pool (``worker.pool:TaskPool``) and broker transport (``worker.broker``): the
replies travel over Redis's pub/sub (kombu's fanout for the pidbox), which the transport's
shared client must leave working.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import use_settings, wait_for
from tests.support.workers import CELERY, ROOT, service_env, start_worker

NODE = f"inspect-{time.monotonic_ns()}@{socket.gethostname()}"


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    env = service_env(module_redis_url, sandbox_process.url)
    worker = start_worker(env, concurrency=4, hostname=NODE)
    app = use_settings(module_redis_url, sandbox_process.url)
    yield {"app": app, "sandbox": sandbox_process, "env": env}
    worker.stop()


def inspect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CELERY, "-A", "worker", "inspect", *args, "-d", NODE, "--timeout", "5", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def control(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CELERY, "-A", "worker", "control", *args, "-d", NODE, "--timeout", "5", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_inspect_ping_gets_a_pong(system):
    result = inspect(system["env"], "ping")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == {NODE: {"ok": "pong"}}


def test_inspect_ping_needs_no_plural_credentials(system):
    """Only the worker needs them: an operator's shell asks the workers with REDIS_URL alone."""
    env = {k: v for k, v in system["env"].items() if not k.startswith("PLURAL_")}
    result = inspect(env, "ping")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == {NODE: {"ok": "pong"}}


def test_inspect_active_lists_a_cancel_in_flight(healthy_sandbox, system):
    from plural_cancel.tasks import enqueue_cancel, get_status

    app, sandbox = system["app"], healthy_sandbox
    [link_id] = sandbox.create_links(1, prefix="pl-inspect-")
    sandbox.set_faults(latency_ms=8000, faults_skip_token=True)
    request_id = enqueue_cancel(link_id, app=app)
    # In flight once its PUT is at the sandbox, held there 8 s ("running" comes earlier, at the
    # claim; a delivery that then gives its rate-limit slot up as late ends at once).
    wait_for(lambda: any(r["method"] == "PUT" and r.get("link_id") == link_id for r in sandbox.requests()), 20,
             0.05, "the cancel's PUT at the sandbox")

    result = inspect(system["env"], "active")
    assert result.returncode == 0, result.stdout + result.stderr
    [task] = json.loads(result.stdout)[NODE]
    assert task["name"] == "tasks.cancel_payment_link"
    assert task["kwargs"]["payment_link_id"] == link_id and task["kwargs"]["request_id"] == request_id
    assert task["hostname"] == NODE and task["acknowledged"] is False  # late acks: held until recorded

    wait_for(lambda: (get_status(request_id, app=app) or {}).get("state") == "succeeded", 20,
             message="the cancel succeeded")
    result = inspect(system["env"], "active")
    assert json.loads(result.stdout) == {NODE: []}


def test_task_events_turned_on_at_run_time_reach_a_monitor(healthy_sandbox, system):
    """What Flower does (its ``enable_events`` option, on by default): ``control enable_events``,
    then it reads the events of every cancel from Redis. Off again afterwards."""
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], healthy_sandbox
    assert json.loads(control(system["env"], "enable_events").stdout) == [{NODE: {"ok": "task events enabled"}}]
    seen: list[dict] = []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        listening = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        listening.start()
        try:
            time.sleep(1.0)  # subscribed before the cancel is sent
            [link_id] = sandbox.create_links(1, prefix="pl-events-")
            request_id = enqueue_cancel(link_id, app=app)
            wait_for(lambda: "task-succeeded" in [e["type"] for e in seen], 15, message="task-succeeded")
        finally:
            receiver.should_stop = True
            listening.join(10)
    events = [e["type"] for e in seen if e.get("hostname") == NODE and e["type"].startswith("task-")]
    received = [e for e in seen if e["type"] == "task-received"]
    assert received[0]["name"] == "tasks.cancel_payment_link" and request_id in received[0]["kwargs"]
    assert {"task-received", "task-started"} <= set(events)
    assert json.loads(control(system["env"], "disable_events").stdout) == [{NODE: {"ok": "task events disabled"}}]
