"""The worker's Prometheus endpoint against a running system: every figure is known exactly."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import use_settings, wait_for
from tests.support.redis_server import free_port
from tests.support.workers import service_env, start_worker


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from the worker's /metrics."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    """A sample's value (0 when absent); a figure of one account's cancels is the default
    account's unless ``account`` is given."""
    found = samples.get((name, tuple(sorted(labels.items()))))
    if found is None and "account" not in labels:
        found = samples.get((name, tuple(sorted({**labels, "account": "default"}.items()))))
    return found or 0.0


def finished(app, request_id, timeout=30.0):
    from plural_cancel.tasks import get_status

    return wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed") and s,
                    timeout, message=f"cancel {request_id} terminal")


@pytest.fixture
def system(redis_url, sandbox_process):
    port = free_port()
    settings = dict(BREAKER_MIN_LINKS="3", BREAKER_WINDOW="1", BREAKER_COOLDOWN="120", CANCEL_RETRY_BASE="0.2",
                    CANCEL_RETRY_CAP="0.5")
    env = service_env(redis_url, sandbox_process.url, METRICS_PORT=str(port), **settings)
    sandbox_process.reset_faults()
    worker = start_worker(env, concurrency=4)
    app = use_settings(redis_url, sandbox_process.url, **settings)
    yield {"app": app, "sandbox": sandbox_process, "port": port}
    worker.stop()
    sandbox_process.reset_faults()


def test_the_metrics_endpoint_counts_what_happened(system):
    from plural_cancel.tasks import enqueue_cancel, enqueue_many

    app, sandbox, port = system["app"], system["sandbox"], system["port"]
    app.runtime.redis.xgroup_create(app.runtime.keys.events, "orders", id="0", mkstream=True)
    samples = scrape(port)
    assert value(samples, "plural_cancel_breaker_state", state="closed") == 1
    assert value(samples, "plural_cancel_queue_depth") == 0
    assert abs(value(samples, "plural_cancel_clock_offset_seconds")) < 1
    assert ("plural_cancel_clock_offset_seconds", ()) in samples

    # Three plain cancels and a paid link (a PUT refused, then a GET).
    links = sandbox.create_links(3, prefix="pl-metrics-ok-")
    [paid] = sandbox.create_links(1, status="PROCESSED", prefix="pl-metrics-paid-")
    for request_id in enqueue_many([*links, paid], app=app):
        finished(app, request_id)
    # One cancel answered 503 twice, then cancelled: two retries.
    [flaky] = sandbox.create_links(1, prefix="pl-metrics-flaky-")
    sandbox.set_faults(error_rates={"503": 1.0}, faults_skip_token=True)
    request_id = enqueue_cancel(flaky, app=app)
    wait_for(lambda: len([r for r in sandbox.requests() if r["method"] == "PUT" and r["link_id"] == flaky]) >= 2,
             20, message="two failed PUTs")
    sandbox.set_faults(error_rates={})
    assert finished(app, request_id)["attempts"] == 3

    puts = len([r for r in sandbox.requests() if r["method"] == "PUT"])
    gets = len([r for r in sandbox.requests() if r["method"] == "GET" and r["link_id"]])
    assert (puts, gets) == (7, 1)
    samples = scrape(port)
    assert value(samples, "plural_cancel_cancels_total", outcome="cancelled") == 4
    assert value(samples, "plural_cancel_cancels_total", outcome="not_cancellable") == 1
    assert value(samples, "plural_cancel_retries_total", reason="PluralServerError") == 2
    assert value(samples, "plural_cancel_plural_request_seconds_count", call="cancel") == puts
    assert value(samples, "plural_cancel_plural_request_seconds_count", call="get") == gets
    assert value(samples, "plural_cancel_plural_request_seconds_bucket", call="cancel", le="+Inf") == puts
    assert 0 < value(samples, "plural_cancel_plural_request_seconds_sum", call="cancel") < puts * 5
    # One slot per attempt, and one per slot given up as late (a busy machine: not sent, and
    # counted as a rate-limit deferral).
    slots = value(samples, "plural_cancel_limiter_wait_seconds_count")
    late = value(samples, "plural_cancel_deferrals_total", reason="rate_limit")
    assert puts <= slots <= puts + late
    assert value(samples, "plural_cancel_records", state="succeeded") == 4
    # Each ending observed once, from its enqueue: seconds, the flaky one's retries included.
    assert value(samples, "plural_cancel_enqueue_to_end_seconds_count", outcome="cancelled") == 4
    assert value(samples, "plural_cancel_enqueue_to_end_seconds_count", outcome="not_cancellable") == 1
    assert 0 < value(samples, "plural_cancel_enqueue_to_end_seconds_sum", outcome="cancelled") < 4 * 30
    assert value(samples, "plural_cancel_oldest_live_seconds") == 0  # none live
    assert value(samples, "plural_cancel_breaker_open_since_seconds") == 0
    assert value(samples, "plural_cancel_records", state="failed") == 1
    assert value(samples, "plural_cancel_dead_letters") == 1
    assert value(samples, "plural_cancel_breaker_openings_total") == 0
    assert value(samples, "plural_cancel_rate_limit_per_second") > 0
    # Five endings announced, none read by the order service's group.
    assert value(samples, "plural_cancel_outcome_consumer_lag", group="orders") == 5
    assert value(samples, "plural_cancel_outcome_consumer_pending", group="orders") == 0
    assert value(samples, "plural_cancel_outcome_consumer_behind_seconds", group="orders") > 0
    # Producer writes (an enqueue_many, an enqueue_cancel) on this Redis, which has no replica: counted (auto).
    assert value(samples, "plural_cancel_unreplicated_writes_total") == 2

    # Plural goes down: three links failing within the 1-s window open the breaker; later cancels are held.
    sandbox.set_faults(outage=True, faults_skip_token=True)
    enqueue_many(sandbox.create_links(4, prefix="pl-metrics-down-"), app=app)
    samples = wait_for(lambda: (s := scrape(port)) and value(s, "plural_cancel_breaker_state", state="open") == 1
                       and value(s, "plural_cancel_deferrals_total", reason="breaker") >= 4 and s, 20,
                       message="breaker open, four cancels held")
    assert value(samples, "plural_cancel_breaker_state", state="closed") == 0
    assert value(samples, "plural_cancel_breaker_openings_total") == 1
    assert value(samples, "plural_cancel_deferred") == 4
    assert value(samples, "plural_cancel_breaker_open_since_seconds") > 0
    assert value(samples, "plural_cancel_oldest_live_seconds") > 0
    assert value(samples, "plural_cancel_records", state="retrying") + value(
        samples, "plural_cancel_records", state="queued") == 4
    # A bulk enqueue while it is open waits in the ledger: nothing reaches the broker.
    enqueue_many(sandbox.create_links(30, prefix="pl-metrics-held-"), app=app)
    samples = scrape(port)
    assert value(samples, "plural_cancel_backlog") == 30 and value(samples, "plural_cancel_queue_depth") == 0


def test_the_malformed_messages_of_every_worker_are_one_counter(system):
    """Read from Redis at each scrape: what another worker counted shows here too."""
    from plural_cancel.worker import malformed

    app, port = system["app"], system["port"]
    assert {value(scrape(port), "plural_cancel_malformed_messages_total", reason=r) for r in malformed.REASONS} == {0}
    app.runtime.redis.lpush(app.conf.task_default_queue, b"not json{")
    malformed.count(app.runtime.redis, app.runtime.keys, malformed.BAD_ARGUMENTS)  # as another worker would
    samples = wait_for(lambda: (s := scrape(port)) and value(s, "plural_cancel_malformed_messages_total",
                                                             reason="undecodable") == 1 and s,
                       10, message="the undecodable item counted")
    assert value(samples, "plural_cancel_malformed_messages_total", reason="bad_arguments") == 1
    assert value(samples, "plural_cancel_malformed_messages_total", reason="unknown_task") == 0
