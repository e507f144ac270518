"""The ledger's scripts against a real Redis: live records never expire, one live cancel per
link, dead letters back, and every due time on Redis's clock whatever the host's says."""

from __future__ import annotations

import time

import pytest

from plural_cancel.config.settings import Settings
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ledger import Ledger
from tests.support.scripts import claim, record

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)

LINK = "pl-ledger-1"


def ledger_for(client, **overrides) -> Ledger:
    options = {"result_ttl": 3600, "stall_timeout": 60.0, "rate": 10.0, "queue": QUEUE}
    return Ledger(client, keys=Keys(), **{**options, **overrides})


def attempts_for(ledger: Ledger):
    """The one writer of an attempt's result, over ``ledger``, with a real breaker and limiter."""
    from plural_cancel.worker.attempts import Attempts
    from plural_cancel.worker.breaker import RedisCircuitBreaker
    from plural_cancel.worker.ratelimit import RedisRateLimiter

    keys = ledger.keys
    breaker = RedisCircuitBreaker(ledger.redis, keys.breaker, window=10, min_links=5, failure_rate=0.5, cooldown=30)
    return Attempts(ledger, breaker, RedisRateLimiter(ledger.redis, keys.ratelimit, rate=100.0))


def test_a_live_record_never_expires_and_result_ttl_counts_from_its_end(redis_client):
    """RESULT_TTL=2, below any retry budget: the deferred cancel outlives it and still ends."""
    ledger = ledger_for(redis_client, result_ttl=2)
    assert ledger.create_many([("req-ttl", LINK)]) == [1]
    key = ledger.keys.record("req-ttl")
    assert redis_client.ttl(key) == -1  # no expiry while queued
    assert claim(ledger, "req-ttl", LINK, "owner-1", lease=30).verdict == "claimed"
    attempts = attempts_for(ledger)
    attempts.defer("req-ttl", LINK, "owner-1", delay=0.1, attempted=True)
    time.sleep(2.5)  # past RESULT_TTL, deferred
    assert redis_client.ttl(key) == -1 and ledger.status("req-ttl")["state"] == "retrying"
    assert claim(ledger, "req-ttl", LINK, "owner-2", lease=30).verdict == "claimed"
    attempts.finish("req-ttl", LINK, "owner-2", state="succeeded", outcome="cancelled", attempted=True)
    assert 0 < redis_client.ttl(key) <= 2  # counted from the end


def test_one_live_cancel_per_link_and_followers_end_with_it(redis_client):
    ledger = ledger_for(redis_client)
    assert ledger.create_many([("lead", LINK), ("again", LINK), ("lead", LINK)]) == [1, 2, 0]
    assert ledger.status("again")["follows"] == "lead"
    # In the due index, to be checked for its leader; never sent while that one is live.
    assert redis_client.zscore(ledger.keys.due, "again") is not None
    assert claim(ledger, "again", LINK, "owner-x", lease=30).verdict == "following"  # a stray copy does nothing
    assert ledger.create_many([("lead", "pl-other")]) == [-1]  # one Request-ID, one link
    assert claim(ledger, "lead", LINK, "owner-1", lease=30).verdict == "claimed"
    attempts_for(ledger).finish("lead", LINK, "owner-1", state="succeeded", outcome="cancelled", attempted=True)
    assert ledger.status("again")["state"] == "succeeded"
    assert redis_client.zscore(ledger.keys.due, "again") is None  # ended with its leader


def overdue(redis_client, ledger, *request_ids):
    """Make these cancels due now (as the stall timeout would, later)."""
    redis_client.zadd(ledger.keys.due, {rid: 0 for rid in request_ids})


def test_a_follower_waits_while_its_leader_is_live(redis_client):
    ledger = ledger_for(redis_client)
    ledger.create_many([("lead", LINK), ("again", LINK)])
    overdue(redis_client, ledger, "again")
    assert ledger.take_due(10) == []  # checked, and due again later
    assert redis_client.zscore(ledger.keys.due, "again") > time.time()
    assert ledger.status("again")["follows"] == "lead"


@pytest.mark.parametrize("vanished", [
    ("plural-cancel:req:lead",),  # deleted by hand
    ("plural-cancel:req:lead", "plural-cancel:followers:lead"),  # a pattern delete: *lead*
])
def test_a_follower_whose_leader_vanished_leads_under_its_own_request_id(redis_client, vanished):
    ledger = ledger_for(redis_client)
    ledger.create_many([("lead", LINK), ("again", LINK)])
    redis_client.delete(*vanished)
    overdue(redis_client, ledger, "again")
    assert ledger.take_due(10) == [("again", LINK)]  # sent: the link still needs cancelling
    assert ledger.status("again")["follows"] is None
    assert redis_client.get(ledger.keys.link(LINK)) == b"again"
    assert claim(ledger, "again", LINK, "owner-1", lease=30).verdict == "claimed"


def test_a_follower_whose_leader_ended_without_it_leads(redis_client):
    """The followers set went (a pattern delete) and the leader ended without ending it."""
    ledger = ledger_for(redis_client)
    ledger.create_many([("lead", LINK), ("again", LINK)])
    redis_client.delete(ledger.keys.followers("lead"))
    claim(ledger, "lead", LINK, "owner-1", lease=30)
    attempts_for(ledger).finish("lead", LINK, "owner-1", state="failed", outcome="gave_up", attempted=True)
    assert ledger.status("again")["state"] == "queued"
    overdue(redis_client, ledger, "again")
    assert ledger.take_due(10) == [("again", LINK)]


def test_a_follower_whose_leader_vanished_follows_the_links_new_live_cancel(redis_client):
    ledger = ledger_for(redis_client)
    ledger.create_many([("lead", LINK), ("again", LINK)])
    redis_client.delete(ledger.keys.record("lead"), ledger.keys.link(LINK))
    assert ledger.create_many([("newer", LINK)]) == [1]  # the link looked free: it leads
    overdue(redis_client, ledger, "again")
    assert ledger.take_due(10) == []
    assert ledger.status("again")["follows"] == "newer"
    claim(ledger, "newer", LINK, "owner-1", lease=30)
    attempts_for(ledger).finish("newer", LINK, "owner-1", state="succeeded", outcome="cancelled", attempted=True)
    assert ledger.status("again")["outcome"] == "cancelled"


def test_a_requeued_dead_letter_follows_a_cancel_started_meanwhile(redis_client):
    ledger = ledger_for(redis_client)
    attempts = attempts_for(ledger)
    ledger.create_many([("dead", LINK)])
    claim(ledger, "dead", LINK, "o1", lease=30)
    attempts.finish("dead", LINK, "o1", state="failed", outcome="gave_up", attempted=True)
    assert ledger.create_many([("fresh", LINK)]) == [1]  # the link is free again: it leads
    assert ledger.requeue(["dead"]) == [("dead", "following", LINK)]
    assert ledger.status("dead")["follows"] == "fresh"
    claim(ledger, "fresh", LINK, "o2", lease=30)
    attempts.finish("fresh", LINK, "o2", state="succeeded", outcome="cancelled", attempted=True)
    assert (ledger.status("dead")["state"], ledger.status("dead")["outcome"]) == ("succeeded", "cancelled")


def test_an_index_entry_stays_until_its_cancel_ends(redis_client):
    """The pump takes an overdue cancel and keeps it indexed, due again after the stall timeout."""
    ledger = ledger_for(redis_client, stall_timeout=0.2)
    ledger.create_many([("req-lost", LINK)])
    assert ledger.take_due(10) == []
    time.sleep(0.3)
    assert ledger.take_due(10) == [("req-lost", LINK)]
    assert ledger.take_due(10) == []  # not again before another stall timeout
    redis_client.rpush(QUEUE, *[b"x"] * 20)  # a backlog of 20 at 10/s: 2 s more before the next try
    time.sleep(0.3)
    assert ledger.take_due(10) == [("req-lost", LINK)]
    now = float(redis_client.time()[0])
    assert redis_client.zscore(ledger.keys.due, "req-lost") >= now + 2.0


def test_a_skewed_worker_clock_does_not_move_a_breaker_hold(redis_url, redis_client):
    """A worker whose clock runs an hour behind holds a cancel for the breaker's cooldown as
    Redis counts it, and its pump brings the cancel back on time."""
    from plural_cancel.config.settings import Settings
    from plural_cancel.worker import create_app
    from plural_cancel.worker.delivery import execute
    from plural_cancel.worker.publisher import pump
    from plural_cancel.worker.runtime import Runtime

    settings = Settings.from_env({"REDIS_URL": redis_url, "PLURAL_CLIENT_ID": "c", "PLURAL_CLIENT_SECRET": "s",
                                  "BREAKER_MIN_LINKS": "2", "BREAKER_COOLDOWN": "0.5"})
    runtime = Runtime(settings, clock=lambda: time.time() - 3600, jitter=lambda: 0.0)
    app = create_app(settings, runtime)
    try:
        record(runtime.breaker, "failure", "pl-down-1")
        assert record(runtime.breaker, "failure", "pl-down-2")  # open for 0.5 s by Redis's clock
        runtime.ledger.create_many([("req-skew", LINK)])
        redis_client.delete(QUEUE)
        assert execute(runtime, LINK, "req-skew") == "held"
        due = redis_client.zscore(runtime.keys.due, "req-skew")
        seconds, micros = redis_client.time()
        now = seconds + micros / 1e6
        assert now < due <= now + 1.0
        time.sleep(0.6)
        assert pump(app) == 1 and redis_client.llen(QUEUE) == 1
    finally:
        app.close()


@pytest.mark.parametrize("bad", ["pl-ab", b"pl-ab"])
def test_enqueue_many_takes_no_single_string(redis_url, bad):
    from plural_cancel.tasks import enqueue_many
    from tests.conftest import use_settings

    with pytest.raises(TypeError, match="payment_link_ids"):
        enqueue_many(bad, app=use_settings(redis_url))


def test_a_callback_is_pending_from_the_end_until_confirmed_and_taken_again_after_its_lease(redis_client):
    """The end of a cancel makes its callback pending in the same script; a sender that takes it
    and dies leaves it to be taken again once its lease ends, under the same task id."""
    from plural_cancel.worker.ledger import Callback

    ledger = ledger_for(redis_client)
    attempts = attempts_for(ledger)
    callback = Callback("orders.on_cancel_outcome", "orders")
    assert ledger.create_many([("cb-1", LINK)], callback=callback) == [1]
    assert ledger.take_callbacks(10, lease=0.3) == []  # live: nothing to tell yet
    claim(ledger, "cb-1", LINK, "o1", lease=30)
    attempts.finish("cb-1", LINK, "o1", state="failed", outcome="not_cancellable", attempted=True,
                    link_status="PROCESSED")
    [first] = ledger.take_callbacks(10, lease=0.3)
    assert (first.request_id, first.callback, first.status) == ("cb-1", callback, ledger.status("cb-1"))
    assert ledger.take_callbacks(10, lease=0.3) == []  # held by its sender
    time.sleep(0.4)  # ... which died before confirming it
    [again] = ledger.take_callbacks(10, lease=0.3)
    assert again.task_id == first.task_id and again.lease != first.lease
    assert ledger.callbacks_sent([first]) == 0  # a late confirmation of the first take removes nothing
    assert ledger.callbacks_sent([again]) == 1
    assert redis_client.zcard(ledger.keys.callbacks) == 0

    # A dead letter retried and ended again is another ending: a callback of its own.
    assert ledger.requeue(["cb-1"]) == [("cb-1", "requeued", LINK)]
    claim(ledger, "cb-1", LINK, "o2", lease=30)
    attempts.finish("cb-1", LINK, "o2", state="succeeded", outcome="cancelled", attempted=True)
    [second_end] = ledger.take_callbacks(10, lease=0.3)
    assert second_end.status["outcome"] == "cancelled" and second_end.task_id != first.task_id


def test_a_cancel_whose_budget_is_spent_ends_with_its_callback_pending(redis_client):
    """``gave_up`` is decided at admission (``worker.attempts``): the same end, the same callback."""
    from plural_cancel.worker.ledger import Callback

    ledger = ledger_for(redis_client)
    attempts = attempts_for(ledger)
    ledger.create_many([("cb-budget", LINK)], callback=Callback("orders.on_cancel_outcome", "orders"))
    assert attempts.admit("cb-budget", LINK, "o1", 30, budget=0.2, max_wait=1.0,
                          probe_max_wait=1.0).claim.verdict == "claimed"
    attempts.defer("cb-budget", LINK, "o1", delay=0.0, attempted=True)
    time.sleep(0.3)
    assert attempts.admit("cb-budget", LINK, "o2", 30, budget=0.2, max_wait=1.0,
                          probe_max_wait=1.0).claim.verdict == "gave_up"
    [pending] = ledger.take_callbacks(10, lease=5)
    assert (pending.request_id, pending.status["outcome"]) == ("cb-budget", "gave_up")


# -- the outcome stream: kept by age, and each consumer group's lag ---------------------------

def test_a_flood_of_rejected_messages_never_pushes_out_an_unread_outcome(redis_client):
    """100,500 malformed messages rejected under their Request-IDs (each an ending, each
    announced) after one real outcome that a slow consumer has not read: it is still there."""
    ledger = ledger_for(redis_client)
    events = ledger.keys.events
    ledger.create_many([("real-1", LINK)])
    claim(ledger, "real-1", LINK, "owner-1", lease=30)
    attempts_for(ledger).finish("real-1", LINK, "owner-1", state="succeeded", outcome="cancelled", attempted=True)
    redis_client.xgroup_create(events, "orders", id="0")
    error = {"http_status": None, "code": "MALFORMED_MESSAGE", "message": "payment_link_id: missing"}
    flood = 100_500
    pipe = redis_client.pipeline(transaction=False)
    keys, args = ledger.finish_call("x", "", "", state="failed", outcome="rejected", attempted=False, last_error=error)
    for n in range(flood):
        rid = f"flood-{n}"
        ledger._reject(keys=[ledger.keys.record(rid), *keys[1:], ledger.keys.schedule_ids],
                       args=[rid, *args[1:], "", ""], client=pipe)
        if n % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    assert redis_client.xlen(events) == flood + 1
    [[_, [(_, first)]]] = redis_client.xreadgroup("orders", "c1", {events: ">"}, count=1)
    assert first[b"request_id"] == b"real-1"
    groups = ledger.consumer_groups()
    assert groups["orders"]["lag"] == flood and groups["orders"]["pending"] == 1 and not groups["orders"]["missed"]


def test_outcomes_older_than_the_retention_are_trimmed_and_a_group_that_missed_them_is_told(redis_client):
    ledger = ledger_for(redis_client, result_ttl=1)  # RESULT_TTL: records and events alike
    events = ledger.keys.events
    writer = attempts_for(ledger)
    redis_client.xgroup_create(events, "slow", id="0", mkstream=True)
    for n in range(300):  # trimming drops whole nodes (100 entries): enough for a few
        ledger.create_many([(f"old-{n}", f"pl-old-{n}")])
        claim(ledger, f"old-{n}", f"pl-old-{n}", "o", lease=30)
        writer.finish(f"old-{n}", f"pl-old-{n}", "o", state="succeeded", outcome="cancelled", attempted=True)
    time.sleep(1.2)
    ledger.create_many([("new", "pl-new")])
    claim(ledger, "new", "pl-new", "o", lease=30)
    writer.finish("new", "pl-new", "o", state="succeeded", outcome="cancelled", attempted=True)
    assert redis_client.xlen(events) < 301
    group = ledger.consumer_groups()["slow"]
    assert group["missed"] and group["oldest_unread_seconds"] >= 1.0
