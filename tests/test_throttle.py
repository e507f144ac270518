"""Throttling that tracks Plural: real workers, a real Redis, the sandbox playing a Plural
that throttles (a lone 429, 5 % at random, its own limit below ours, both; and a throttle in
Plural's words). Shorter runs and looser bounds than ``bench/throttle.py``, which measures
the same cases at 10/s and 100/s beside the controller this one replaced.

Every figure comes from the sandbox's own log of arrivals: a backlog drains throughout, so
what is sent a second is the fleet's pace, and what is accepted its goodput.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import FIGURES, use_settings, wait_for
from tests.support.sandbox import is_throttle
from tests.support.workers import service_env, start_worker

LIMIT = 20
"""``PLURAL_RATE_LIMIT``: cancels per second to Plural."""


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox_process):
    settings = {"PLURAL_RATE_LIMIT": LIMIT}
    env = service_env(module_redis_url, sandbox_process.url, **settings)
    workers = [start_worker(env, concurrency=16) for _ in range(2)]
    app = use_settings(module_redis_url, sandbox_process.url, **settings)
    yield {"app": app, "sandbox": sandbox_process}
    for worker in workers:
        worker.stop()


@pytest.fixture(autouse=True)
def _fresh(system):
    """Each test starts from an idle fleet at its full pace, and a sandbox without faults:
    what a test left to drain is dropped, and what the workers still held is let finish."""
    sandbox, app = system["sandbox"], system["app"]
    yield
    sandbox.reset_faults()
    app.runtime.redis.flushdb()
    quiet = time.monotonic() + 30
    while time.monotonic() < quiet:
        seen = len(sandbox.requests())
        time.sleep(1.5)
        if len(sandbox.requests()) == seen:
            break
    app.runtime.redis.flushdb()  # and the pace those last answers wrote


def puts(sandbox, since: float, until: float) -> list[dict]:
    return [r for r in sandbox.requests() if r["method"] == "PUT" and since <= r["timestamp"] < until]


def figures(sandbox, since: float, until: float) -> tuple[float, float, float]:
    """(sent a second, accepted a second, share throttled) of the cancels arriving in [since, until)."""
    calls = puts(sandbox, since, until)
    throttled = sum(map(is_throttle, calls))
    seconds = until - since
    return len(calls) / seconds, (len(calls) - throttled) / seconds, throttled / max(1, len(calls))


def backlog(system, count: int, prefix: str) -> tuple[list[str], float]:
    """``count`` cancels enqueued at once (a clean-up): the fleet drains them at its pace."""
    from plural_cancel.tasks import enqueue_many

    links = system["sandbox"].create_links(count, prefix=prefix)
    started = time.time()
    return enqueue_many(links, app=system["app"]), started


def record(record_property, text: str) -> None:
    record_property(FIGURES, f"[throttle] {text}")


def test_a_lone_429_costs_a_moment_not_a_minute(system, record_property):
    sandbox = system["sandbox"]
    _, started = backlog(system, 260, "pl-lone-")
    wait_for(lambda: len(puts(sandbox, started, time.time() + 1)) >= 60, 20, 0.05, message="60 cancels sent")
    sandbox.set_faults(throttle_rate=1.0)  # the next cancel or two are answered 429
    wait_for(lambda: any(is_throttle(r) for r in puts(sandbox, started, time.time() + 1)), 5, 0.01,
             message="a 429")
    sandbox.set_faults(throttle_rate=0.0)
    at = min(r["timestamp"] for r in puts(sandbox, started, time.time() + 1) if is_throttle(r))
    time.sleep(4)
    throttled = sum(map(is_throttle, puts(sandbox, started, time.time())))
    sent, _, _ = figures(sandbox, at + 0.5, at + 3.5)
    record(record_property, f"lone 429 ({throttled} throttled): {sent:.1f}/s sent in the 3 s after, "
                            f"{sent / LIMIT:.2f} of the limit")
    assert sent >= 0.85 * LIMIT  # the controller this one replaced halved it, for a minute


def test_random_429s_cost_no_more_than_they_take(system, record_property):
    sandbox = system["sandbox"]
    sandbox.set_faults(throttle_rate=0.05, retry_after=1)
    _, started = backlog(system, 400, "pl-noise-")
    time.sleep(15)
    sent, accepted, share = figures(sandbox, started + 2, started + 14)
    record(record_property, f"5 % random 429s: {accepted:.1f}/s accepted ({accepted / LIMIT:.2f} of the limit), "
                            f"{share:.0%} throttled")
    assert accepted >= 0.80 * LIMIT  # the controller this one replaced: 0.2


@pytest.mark.parametrize("noise", [0.0, 0.05], ids=["lower-limit", "lower-limit-and-noise"])
def test_a_plural_limit_below_ours_is_tracked_with_few_429s(system, record_property, noise):
    sandbox = system["sandbox"]
    theirs = 0.6 * LIMIT
    sandbox.set_faults(limit_rps=theirs, throttle_rate=noise, retry_after=1)
    _, started = backlog(system, 400, f"pl-lower-{int(noise * 100)}-")
    time.sleep(20)
    sent, accepted, share = figures(sandbox, started + 8, started + 20)
    record(record_property, f"Plural's limit {theirs:g}/s, {noise:.0%} noise: {accepted:.1f}/s accepted "
                            f"({accepted / theirs:.2f} of Plural's limit), {share:.0%} throttled, {sent:.1f}/s sent")
    assert accepted >= (0.85 if not noise else 0.8) * theirs
    assert share <= (0.15 if not noise else 0.2)


def test_a_throttle_in_plurals_words_is_retried_never_rejected(system):
    from plural_cancel.tasks.producer import get_statuses

    sandbox, app = system["sandbox"], system["app"]
    sandbox.set_faults(plural_throttle_rate=0.3)
    request_ids, started = backlog(system, 40, "pl-words-")
    wait_for(lambda: all(s and s["state"] in ("succeeded", "failed") for s in get_statuses(request_ids, app=app)),
             30, 0.2, message="every cancel ended")
    assert {(s["state"], s["outcome"]) for s in get_statuses(request_ids, app=app)} == {("succeeded", "cancelled")}
    answers = puts(sandbox, started, time.time())
    assert any(r["status"] == 400 for r in answers)  # PAYMENT_RATE_LIMIT: the link left untouched, then cancelled
