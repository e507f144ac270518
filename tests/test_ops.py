"""The operator's commands against a running system: ``failed list|retry``, ``stats``, ``check``.

Each command runs its console script's ``main`` in this process, configured by the
environment (``tests/support/cli.py``), against a real Redis, worker and sandbox; ``check``
on a healthy system also runs as the operator runs it, the console script in a process
of its own.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pytest

from tests.conftest import use_settings, wait_for
from tests.support.cli import run as cli
from tests.support.cli import run_process
from tests.support.redis_server import free_port
from tests.support.slow_tcp import SlowRelay
from tests.support.workers import ROOT, service_env, skewed_clock, start_worker


def finished(app, request_id, timeout=30.0):
    from plural_cancel.tasks import get_status

    return wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed") and s,
                    timeout, message=f"cancel {request_id} terminal")


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    """A worker with a 2-second retry budget (so outages end in ``gave_up`` quickly)."""
    settings = dict(CANCEL_RETRY_BUDGET="2", CANCEL_RETRY_BASE="0.2", CANCEL_RETRY_CAP="0.5",
                    BREAKER_MIN_LINKS="1000")
    env = service_env(module_redis_url, sandbox_process.url, **settings)
    worker = start_worker(env, concurrency=4)
    app = use_settings(module_redis_url, sandbox_process.url, **settings)
    yield {"app": app, "sandbox": sandbox_process, "env": env, "redis_url": module_redis_url, "settings": settings}
    worker.stop()


@pytest.fixture(autouse=True)
def _healthy(healthy_sandbox):
    """Every test here starts and ends with the sandbox's start-up faults (none)."""


def gave_up(system, links):
    """Cancel ``links`` through an outage until each has given up; returns their Request-IDs."""
    from plural_cancel.tasks import enqueue_many

    app, sandbox = system["app"], system["sandbox"]
    sandbox.set_faults(outage=True, faults_skip_token=True)
    request_ids = enqueue_many(links, app=app)
    for request_id in request_ids:
        assert finished(app, request_id)["outcome"] == "gave_up"
    sandbox.reset_faults()
    return request_ids


def test_failed_retry_turns_a_dead_letter_into_a_success(system):
    from plural_cancel.tasks import get_status

    app, sandbox, env = system["app"], system["sandbox"], system["env"]
    [link_id] = sandbox.create_links(1, prefix="pl-ops-retry-")
    [request_id] = gave_up(system, [link_id])
    attempts_before = get_status(request_id, app=app)["attempts"]

    listed = cli(env, "failed", "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if request_id in line]
    assert link_id in row and "gave_up" in row and "503 INTERNAL_ERROR" in row
    records = json.loads(cli(env, "failed", "list", "--json").stdout)
    assert request_id in [r["request_id"] for r in records]

    retried = cli(env, "failed", "retry", request_id)  # the sandbox is healthy again
    assert (retried.returncode, retried.stdout.strip()) == (0, f"requeued {request_id}"), retried.stderr
    status = finished(app, request_id)
    assert (status["state"], status["outcome"]) == ("succeeded", "cancelled")
    assert status["request_id"] == request_id and status["attempts"] == attempts_before + 1
    assert sandbox.link(link_id)["status"] == "CANCELLED"
    puts = [r for r in sandbox.requests() if r["method"] == "PUT" and r["link_id"] == link_id]
    assert {p["request_id"] for p in puts} == {request_id}  # one idempotency key throughout
    assert request_id not in [r["request_id"] for r in json.loads(cli(env, "failed", "list", "--json").stdout)]


def test_failed_retry_all_requeues_every_dead_letter(system):
    app, sandbox, env = system["app"], system["sandbox"], system["env"]
    links = sandbox.create_links(3, prefix="pl-ops-all-")
    request_ids = gave_up(system, links)
    before = json.loads(cli(env, "failed", "list", "--json", "--limit", "0").stdout)
    assert set(request_ids) <= {r["request_id"] for r in before}

    retried = cli(env, "failed", "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(f"requeued {len(before)} failed cancels")
    for request_id in request_ids:
        assert finished(app, request_id)["outcome"] == "cancelled"
    assert json.loads(cli(env, "failed", "list", "--json").stdout) == []
    assert cli(env, "failed", "list").stdout.strip() == "no failed cancels"


@pytest.mark.parametrize("args, code, says", [
    (("failed", "retry"), 2, "REQUEST_ID or --all"),
    (("failed", "retry", "some-id", "--all"), 2, "REQUEST_ID or --all"),
    (("failed", "retry", "has space"), 2, "request_id"),
    (("failed", "retry", "never-enqueued"), 1, "no failed cancel"),
])
def test_failed_retry_refuses_what_it_cannot_retry(system, args, code, says):
    result = cli(system["env"], *args)
    assert result.returncode == code
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_cancel_that_is_not_failed_is_not_retried(system):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, prefix="pl-ops-done-")
    request_id = enqueue_cancel(link_id, app=app)
    assert finished(app, request_id)["outcome"] == "cancelled"
    result = cli(system["env"], "failed", "retry", request_id)
    assert result.returncode == 1 and "not failed" in result.stderr


def stats(env) -> dict:
    result = cli(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_stats_follow_a_running_system(system, redis_url, sandbox_process):
    """A Redis database of its own, so that every figure is known exactly.

    (The ``redis_url`` fixture flushes every database, the module's too: later tests here
    must not count on the module's records.)
    """
    from plural_cancel.tasks import enqueue_many

    settings = dict(BREAKER_MIN_LINKS="2", BREAKER_WINDOW="1", BREAKER_COOLDOWN="120", CANCEL_RETRY_BASE="0.2",
                    CANCEL_RETRY_CAP="0.5")
    env = service_env(redis_url, sandbox_process.url, **settings)
    app = use_settings(redis_url, sandbox_process.url, **settings)
    sandbox = sandbox_process
    links = sandbox.create_links(3, prefix="pl-ops-stats-")

    # An order service's consumer group, which reads nothing here.
    app.runtime.redis.xgroup_create(app.runtime.keys.events, "orders", id="0", mkstream=True)
    # No worker yet: three cancels wait in the queue.
    enqueue_many(links, app=app)
    figures = stats(env)
    assert figures["states"] == {"queued": 3, "running": 0, "retrying": 0, "succeeded": 0, "failed": 0}
    assert (figures["queue_depth"], figures["deferred"], figures["dead_letters"]) == (3, 0, 0)
    assert figures["backlog"] == 0  # three fit in the two seconds' room: all sent at once
    assert figures["breaker"]["state"] == "closed"
    assert 0 < figures["rate"]["current_per_second"] <= figures["rate"]["limit_per_second"] == 10

    worker = start_worker(env, concurrency=2)
    try:
        [paid] = sandbox.create_links(1, status="PROCESSED", prefix="pl-ops-paid-")
        more = enqueue_many([paid, "pl-ops-no-such-link"], app=app)
        for request_id in more:
            finished(app, request_id)
        wait_for(lambda: stats(env)["states"]["succeeded"] == 3, 20, message="three succeeded")
        figures = stats(env)
        assert figures["states"] == {"queued": 0, "running": 0, "retrying": 0, "succeeded": 3, "failed": 2}
        assert figures["outcomes"] == {"cancelled": 3, "not_cancellable": 1, "rejected": 1}
        assert (figures["queue_depth"], figures["deferred"], figures["dead_letters"]) == (0, 0, 2)
        orders = figures["consumer_groups"]["orders"]
        assert (orders["lag"], orders["pending"], orders["missed"]) == (5, 0, False)
        assert 0 <= orders["oldest_unread_seconds"] < 60

        # Plural goes down: the second link failing opens the breaker (BREAKER_MIN_LINKS 2) and the
        # cancels wait in Redis for it to reopen, two minutes later.
        sandbox.set_faults(outage=True, faults_skip_token=True)
        held = sandbox.create_links(2, prefix="pl-ops-held-")
        enqueue_many(held, app=app)
        wait_for(lambda: (f := stats(env))["deferred"] == 2 and f["breaker"]["state"] == "open" and f, 20,
                 message="two cancels held by an open breaker")
        figures = stats(env)
        assert figures["states"]["queued"] + figures["states"]["retrying"] == 2
        assert figures["states"]["retrying"] >= 1 and figures["states"]["running"] == 0
        assert figures["breaker"]["reopens_at"] and figures["queue_depth"] == 0

        text = cli(env, "stats")
        assert text.returncode == 0
        assert "breaker       open" in text.stdout and "deferred      2 " in text.stdout
        assert re.search(r"consumers     orders: \d+ unread, oldest unread \d+ s old, 0 pending\n", text.stdout)
    finally:
        worker.stop()
        sandbox.reset_faults()
        # The app is process-wide: point it back at the module's Redis and worker.
        use_settings(system["redis_url"], sandbox.url, **system["settings"])


def test_stats_show_the_malformed_messages_every_worker_dropped(system, redis_url, sandbox_process):
    """A Redis database of its own (as above), so that every count is known exactly."""
    env = service_env(redis_url, sandbox_process.url)
    app = use_settings(redis_url, sandbox_process.url)
    queue = app.conf.task_default_queue
    assert stats(env)["malformed"] == {"undecodable": 0, "not_a_task_message": 0, "unknown_task": 0,
                                       "bad_arguments": 0, "request_id_conflict": 0}
    worker = start_worker(env, concurrency=2)
    try:
        client = app.runtime.redis
        client.lpush(queue, b"not json{", b"[1]")
        app.send_task("tasks.no_such_task")
        wait_for(lambda: sum(stats(env)["malformed"].values()) == 3, 20, message="three malformed messages counted")
        assert stats(env)["malformed"] == {"undecodable": 1, "not_a_task_message": 1, "unknown_task": 1,
                                           "bad_arguments": 0, "request_id_conflict": 0}
        text = cli(env, "stats")
        assert text.returncode == 0
        assert ("malformed     undecodable 1  not_a_task_message 1  unknown_task 1  bad_arguments 0  "
                "request_id_conflict 0") in text.stdout
    finally:
        worker.stop()
        use_settings(system["redis_url"], sandbox_process.url, **system["settings"])


def test_stats_without_redis_exits_1(system):
    env = {**system["env"], "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = cli(env, "stats")
    assert result.returncode == 1 and "cannot reach Redis at redis://127.0.0.1:" in result.stderr


def test_check_says_what_is_wrong_with_its_exit_status(system):
    env = system["env"]
    ok = run_process(env, "check", cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    settings_line, redis_line, clock_line, plural_line = ok.stdout.splitlines()
    assert (settings_line, plural_line) == ("settings   ok", "token default: ok (client id test...)")
    assert re.fullmatch(r"redis      ok \(round trip \d+\.\d ms\)", redis_line), redis_line
    assert re.fullmatch(r"clock      ok \([+-]\d+ ms off Redis's\)", clock_line), clock_line

    # A host whose clock is an hour ahead: Plural would see it in every Request-Timestamp.
    skewed = run_process({**env, **skewed_clock(3600)}, "check", cwd=ROOT)
    assert skewed.returncode == 1, skewed.stderr
    assert re.search(r"clock      this host's clock is \+3600\.\d s off Redis's", skewed.stderr), skewed.stderr

    bad_setting = cli({**env, "PLURAL_RATE_LIMIT": "fast"}, "check")
    assert bad_setting.returncode == 2 and "PLURAL_RATE_LIMIT" in bad_setting.stderr
    no_credentials = cli({k: v for k, v in env.items() if k != "PLURAL_CLIENT_SECRET"}, "check")
    assert no_credentials.returncode == 2 and "PLURAL_CLIENT_SECRET" in no_credentials.stderr

    no_redis = cli({**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "check")
    assert no_redis.returncode == 1 and "redis      unreachable" in no_redis.stderr
    # A Redis 40 ms away: a PUT must leave within 25 ms of asking Redis for its slot, so no
    # cancel would ever be sent.
    url = urlsplit(env["REDIS_URL"])
    far = SlowRelay((url.hostname, url.port), delay=0.04)
    try:
        too_far = cli({**env, "REDIS_URL": f"redis://127.0.0.1:{far.port}{url.path}"}, "check")
    finally:
        far.close()
    assert too_far.returncode == 1 and re.search(r"redis      answers in (\d+) ms", too_far.stderr), too_far.stderr
    assert int(re.search(r"answers in (\d+) ms", too_far.stderr)[1]) >= 40
    assert "every slot would be given up" in too_far.stderr and too_far.stdout == "settings   ok\n"
    wrong_secret = cli({**env, "PLURAL_CLIENT_SECRET": "not-the-secret"}, "check")
    assert wrong_secret.returncode == 1
    assert wrong_secret.stdout.splitlines()[-1].startswith("token default: FAILED (auth_failed: Generate Token "
                                                           "refused the credentials")
    assert wrong_secret.stderr == "plural-cancel: no Plural token for 1 of 1 account: default\n"
    assert "not-the-secret" not in wrong_secret.stdout + wrong_secret.stderr
