"""Failure reporting end to end: a real worker sends real Sentry envelopes to a loopback server.

Nothing of ours is mocked: the worker is a ``celery worker`` process with ``SENTRY_DSN``
pointing at :class:`tests.support.fake_sentry.FakeSentry`, Plural is the sandbox process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import redis

from tests.conftest import use_settings, wait_for
from tests.support.workers import ROOT, service_env, start_beat, start_worker

SECRET = "test-secret-do-not-leak"


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process, sentry):
    """One worker reporting to the fake Sentry; the breaker is kept out of the way."""
    env = service_env(module_redis_url, sandbox_process.url, SENTRY_DSN=sentry.dsn, SENTRY_ENVIRONMENT="test",
                      CANCEL_RETRY_BUDGET="3", CANCEL_RETRY_BASE="0.2", CANCEL_RETRY_CAP="0.5",
                      BREAKER_MIN_LINKS="1000")
    worker = start_worker(env, concurrency=4)
    # The producer sets a record's deadline: it needs the same short retry budget.
    app = use_settings(module_redis_url, sandbox_process.url, CANCEL_RETRY_BUDGET="3")
    yield {"app": app, "sandbox": sandbox_process, "env": env, "worker": worker, "redis_url": module_redis_url}
    worker.stop()


@pytest.fixture(autouse=True)
def _healthy(healthy_sandbox):
    """Every test here starts and ends with the sandbox's start-up faults (none)."""


def finished(app, request_id, timeout=30.0):
    from plural_cancel.tasks import get_status

    return wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed") and s,
                    timeout, message=f"cancel {request_id} terminal")


def events_for(sentry, request_id):
    return [e for e in sentry.events() if (e.get("tags") or {}).get("request_id") == request_id]


def test_a_cancel_that_gives_up_is_one_event_with_its_tags(system, sentry):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, prefix="pl-sentry-gaveup-")
    sandbox.set_faults(outage=True, faults_skip_token=True)  # a token is issued, every cancel answers 503
    request_id = enqueue_cancel(link_id, app=app)
    status = finished(app, request_id)
    assert (status["state"], status["outcome"]) == ("failed", "gave_up")
    assert status["attempts"] >= 2

    [event] = sentry.wait_for_events(lambda e: e.get("tags", {}).get("request_id") == request_id)
    time.sleep(1.5)  # a second report would have arrived by now
    assert len(events_for(sentry, request_id)) == 1
    assert event["level"] == "error"
    expected = {"payment_link_id": link_id, "request_id": request_id, "account": "default", "outcome": "gave_up",
                "plural_code": "INTERNAL_ERROR", "http_status": "503", "attempts": str(status["attempts"]),
                "link_status": "none"}
    assert {k: event["tags"].get(k) for k in expected} == expected  # (Celery's integration adds its task id)
    assert event["fingerprint"] == ["plural-cancel", "cancel-failed", "gave_up", "INTERNAL_ERROR"]
    assert event["environment"] == "test"
    assert "gave_up" in event["message"] or "gave_up" in event.get("logentry", {}).get("message", "")


def test_one_outage_is_one_issue(system, sentry):
    """Many cancels failing for one reason share one fingerprint: one Sentry issue."""
    from plural_cancel.tasks import enqueue_many

    app, sandbox = system["app"], system["sandbox"]
    links = sandbox.create_links(3, prefix="pl-sentry-outage-")
    sandbox.set_faults(outage=True, faults_skip_token=True)
    request_ids = enqueue_many(links, app=app)
    for request_id in request_ids:
        assert finished(app, request_id)["outcome"] == "gave_up"
    events = sentry.wait_for_events(lambda e: e.get("tags", {}).get("request_id") in request_ids, count=3)
    assert len(events) == 3
    assert {tuple(e["fingerprint"]) for e in events} == {("plural-cancel", "cancel-failed", "gave_up",
                                                           "INTERNAL_ERROR")}


def test_a_message_whose_request_id_names_another_link_is_counted_and_reported_once(system, sentry):
    """An order that got a new link, sent by name under the order's old Request-ID: the
    second link is not cancelled, so someone must hear of it, with both links."""
    from plural_cancel.tasks import enqueue_cancel, get_status
    from plural_cancel.worker import malformed

    app, sandbox = system["app"], system["sandbox"]
    first, second = sandbox.create_links(2, prefix="pl-sentry-reuse-")
    request_id = enqueue_cancel(first, request_id="order-1-expiry-reuse", app=app)
    assert finished(app, request_id)["outcome"] == "cancelled"
    client = redis.Redis.from_url(system["redis_url"])
    before = malformed.counts(client, app.runtime.keys)[malformed.REQUEST_ID_CONFLICT]
    app.send_task("tasks.cancel_payment_link", kwargs={"payment_link_id": second, "request_id": request_id},
                  queue=app.settings.cancel_queue)
    [event] = sentry.wait_for_events(lambda e: e.get("tags", {}).get("request_id") == request_id)
    assert (event["tags"]["payment_link_id"], event["tags"]["taken_by"]) == (second, first)
    assert event["fingerprint"] == ["plural-cancel", "request-id-conflict"]
    assert malformed.counts(client, app.runtime.keys)[malformed.REQUEST_ID_CONFLICT] == before + 1
    time.sleep(1.5)  # the error log line must not arrive as a second event
    assert len(events_for(sentry, request_id)) == 1
    assert get_status(request_id, app=app)["payment_link_id"] == first  # the first cancel's record, untouched
    assert not [r for r in sandbox.requests() if r.get("link_id") == second]
    assert "names the cancel of another link" in system["worker"].log()


def test_three_retries_then_success_report_nothing(system, sentry):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, prefix="pl-sentry-retry-")
    sandbox.set_faults(error_rates={"503": 1.0}, faults_skip_token=True)
    seen = len(sentry.envelopes())
    request_id = enqueue_cancel(link_id, app=app)
    wait_for(lambda: len([r for r in sandbox.requests() if r["method"] == "PUT" and r["link_id"] == link_id]) >= 3,
             20, message="three failed PUTs")
    sandbox.set_faults(error_rates={})
    status = finished(app, request_id)
    assert (status["state"], status["outcome"]) == ("succeeded", "cancelled")
    assert status["attempts"] >= 4
    time.sleep(2.0)  # anything the worker would report has been sent by now
    assert events_for(sentry, request_id) == []
    later = b"\n".join(env.raw for env in sentry.envelopes()[seen:])
    assert request_id.encode() not in later and link_id.encode() not in later


def test_a_paid_link_is_a_warning(system, sentry):
    from plural_cancel.tasks import enqueue_cancel

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, status="PROCESSED", prefix="pl-sentry-paid-")
    request_id = enqueue_cancel(link_id, app=app)
    assert finished(app, request_id)["outcome"] == "not_cancellable"
    [event] = sentry.wait_for_events(lambda e: e.get("tags", {}).get("request_id") == request_id)
    assert event["level"] == "warning"
    assert event["tags"]["outcome"] == "not_cancellable"
    assert event["tags"]["link_status"] == "PROCESSED"
    assert (event["tags"]["plural_code"], event["tags"]["http_status"]) == ("INVALID_REQUEST", "400")
    assert event["fingerprint"] == ["plural-cancel", "cancel-failed", "not_cancellable", "INVALID_REQUEST"]


def test_no_envelope_holds_a_token_the_secret_or_customer_data(system, sentry):
    """After the runs above (the worker held a token, read customers' links), search every byte sent."""
    from plural_cancel.tasks import enqueue_cancel
    from plural_cancel.worker.tokens import RedisTokenCache

    app, sandbox = system["app"], system["sandbox"]
    # A demo link: Plural's answer about it carries a full customer (e-mail, phone, names).
    sandbox.set_link_status("pl-demo-created-01", "PROCESSED")
    request_id = enqueue_cancel("pl-demo-created-01", app=app)
    assert finished(app, request_id)["outcome"] == "not_cancellable"
    sentry.wait_for_events(lambda e: e.get("tags", {}).get("request_id") == request_id)

    def no_fetch():
        raise AssertionError("the worker should have cached a token")

    client = redis.Redis.from_url(system["redis_url"])
    token = RedisTokenCache(client, "test-client", SECRET).get(no_fetch)  # the worker's own bearer token
    customer = sandbox.link("pl-demo-created-01")["customer"]
    forbidden = {SECRET, token, customer["email_id"], customer["mobile_number"], customer["first_name"],
                 customer["last_name"], customer["billing_address"]["address1"]}
    raw = sentry.raw()
    assert raw.count(b'"type":"event"') + raw.count(b'"type": "event"') >= 5  # the search saw the events
    for value in forbidden:
        assert value.encode() not in raw, f"found a forbidden value in a Sentry envelope: {value[:4]}..."


def test_the_scrubbers_mask_secrets_in_events_and_breadcrumbs(sentry):
    """Code that does log a secret, a token or personal data: Sentry still never receives it.

    A separate process (Sentry is process-wide) runs the product's own ``reporting.init``
    and then misbehaves on purpose in every way a careless line of code could.
    """
    script = textwrap.dedent(f"""
        import logging, sentry_sdk
        from plural_cancel.config.settings import Settings
        from plural_cancel.worker import reporting
        settings = Settings.from_env({{"SENTRY_DSN": {sentry.dsn!r}, "PLURAL_CLIENT_ID": "test-client",
                                       "PLURAL_CLIENT_SECRET": {SECRET!r}}})
        assert reporting.init(settings)
        log = logging.getLogger("careless")
        log.warning("calling with Authorization: Bearer tok-AAAA1111bbbb2222 for priya.iyer@example.com",
                    extra={{"client_secret": {SECRET!r}, "phone": "9840023456", "note": "mobile +91 98400 23456"}})
        log.info("secret is {SECRET} and redis://:hunter22@cache:6379/0")
        sentry_sdk.set_extra("customer", {{"email_id": "priya.iyer@example.com"}})
        sentry_sdk.set_extra("token", "tok-AAAA1111bbbb2222")
        try:
            raise RuntimeError("refused for priya.iyer@example.com, phone 9840023456, secret {SECRET}")
        except RuntimeError:
            log.exception("careless failure with Bearer tok-AAAA1111bbbb2222")
        sentry_sdk.flush(10)
    """)
    before = len(sentry.envelopes())
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    raw = b"\n".join(env.raw for env in sentry.envelopes()[before:])
    assert b"careless failure" in raw and b"breadcrumbs" in raw  # the event and its breadcrumbs arrived
    for value in (SECRET, "tok-AAAA1111bbbb2222", "priya.iyer@example.com", "9840023456", "98400 23456",
                  "hunter22"):
        assert value.encode() not in raw, f"{value[:4]}... reached Sentry"


def test_beat_jobs_check_in_as_sentry_crons(system, sentry):
    """The schedule firer runs every second (finer than Sentry Crons' minute): the worker checks it in."""
    beat = start_beat(system["env"])
    try:
        check_ins = wait_for(lambda: [c for c in sentry.check_ins() if c.get("monitor_slug") == "fire-schedules"],
                             45, message="a check-in of the schedule firer")
        assert check_ins[0]["status"] == "ok"
        assert check_ins[0]["monitor_config"]["schedule"] == {"type": "interval", "value": 1, "unit": "minute"}
    finally:
        beat.stop()


def test_worker_logs_one_json_line_per_state_change(system):
    """stderr is a file here, so every log line is a JSON object carrying the cancel's ids."""
    import json

    from plural_cancel.tasks import enqueue_cancel
    from plural_cancel.worker.tokens import RedisTokenCache

    app, sandbox = system["app"], system["sandbox"]
    [link_id] = sandbox.create_links(1, prefix="pl-logs-")
    sandbox.set_faults(error_rates={"503": 1.0}, faults_skip_token=True)
    request_id = enqueue_cancel(link_id, app=app)
    wait_for(lambda: [r for r in sandbox.requests() if r["method"] == "PUT" and r["link_id"] == link_id], 20,
             message="a failed PUT")
    sandbox.set_faults(error_rates={})
    assert finished(app, request_id)["outcome"] == "cancelled"
    time.sleep(0.5)  # the worker writes its last line after the ledger

    text = system["worker"].log()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    mine = [line for line in lines
            if line["logger"] == "plural_cancel.tasks.cancel" and line.get("request_id") == request_id]
    # "cancel running" is a DEBUG line: the worker logs at INFO, one line per outcome. The
    # first retry may come before the fault is lifted, so count the 503s the sandbox served.
    failed_puts = [r for r in sandbox.requests() if r["method"] == "PUT" and r["link_id"] == link_id
                   and r["status"] == 503]
    assert failed_puts
    assert [line["state"] for line in mine] == ["retrying"] * len(failed_puts) + ["succeeded"]
    assert mine[-1]["state"] == "succeeded" and mine[-1]["outcome"] == "cancelled"
    assert all(line["payment_link_id"] == link_id for line in mine)
    assert mine[0]["error"] == {"http_status": 503, "code": "INTERNAL_ERROR",
                                "message": "service temporarily unavailable"}
    token = RedisTokenCache(redis.Redis.from_url(system["redis_url"]), "test-client", SECRET).get(
        lambda: pytest.fail("the worker should have cached a token"))
    assert SECRET not in text and token not in text


def test_log_formatters_render_extras_and_mask_secrets():
    """The two formatters on their own: text for a terminal, JSON elsewhere, both redacted."""
    import json
    import logging

    from plural_cancel.worker.logs import JsonFormatter, TextFormatter
    from plural_cancel.worker.redaction import Redactor

    redactor = Redactor([SECRET])
    record = logging.LogRecord("plural_cancel.tasks.cancel", logging.WARNING, __file__, 1, "cancel %s: %s for %s",
                               ("failed", "rejected", "priya.iyer@example.com"), None)
    record.request_id, record.payment_link_id, record.note = "r-1", "pl-1", f"Bearer abcdefgh12345678 {SECRET}"
    line = json.loads(JsonFormatter(redactor).format(record))
    assert line["message"] == "cancel failed: rejected for [email]"
    assert (line["level"], line["request_id"], line["payment_link_id"]) == ("warning", "r-1", "pl-1")
    assert line["note"] == "Bearer [Filtered] [Filtered]"
    text = TextFormatter(redactor).format(record)
    assert "cancel failed: rejected for [email] request_id=r-1 payment_link_id=pl-1" in text
    assert SECRET not in text and "abcdefgh12345678" not in text


def test_the_breaker_opening_is_reported_once(system, redis_url, sandbox_process, sentry):
    """Its own Redis database and worker: an open breaker would hold the other tests' cancels.

    Last in this module: the ``redis_url`` fixture flushes every database, the module's too.
    """
    from plural_cancel.tasks import enqueue_many

    env = service_env(redis_url, sandbox_process.url, SENTRY_DSN=sentry.dsn, BREAKER_MIN_LINKS="2",
                      BREAKER_COOLDOWN="60", CANCEL_RETRY_BASE="0.2", CANCEL_RETRY_CAP="0.5")
    app = use_settings(redis_url, sandbox_process.url)
    links = sandbox_process.create_links(6, prefix="pl-sentry-breaker-")
    sandbox_process.set_faults(outage=True, faults_skip_token=True)
    worker = start_worker(env, concurrency=2)
    try:
        enqueue_many(links, app=app)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_for(lambda: client.hget("plural-cancel:breaker", "state") == "open", 20, message="breaker open")
        time.sleep(3.0)  # every cancel has tried or been held by now
        fingerprint = ["plural-cancel", "breaker-opened", "default"]  # one issue per account's breaker
        sentry.wait_for_events(lambda e: e.get("fingerprint") == fingerprint)
        time.sleep(1.0)
        opened = [e for e in sentry.events() if e.get("fingerprint") == fingerprint]
        assert len(opened) == 1
        assert (opened[0]["tags"]["plural_code"], opened[0]["tags"]["account"]) == ("INTERNAL_ERROR", "default")
        # ...and its ERROR log line did not become a second event through the logging integration.
        echoes = [e for e in sentry.events() if "circuit breaker opened" in str(e.get("logentry", ""))]
        assert echoes == []
        # Held cancels and retries are control flow: nothing else was reported.
        assert not [e for e in sentry.events() if e.get("tags", {}).get("payment_link_id") in links]
    finally:
        worker.stop()
        # The app is process-wide: point it back at the module's Redis and worker.
        use_settings(system["redis_url"], sandbox_process.url, CANCEL_RETRY_BUDGET="3")
