"""A bulk enqueue waits in the ledger's compact form; the broker carries only what the
fleet can run soon (#13 §2). Ledger-level tests against a real Redis, then one real
worker draining a backlog from the sandbox."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from plural_cancel.config.celery import BACKLOG_AHEAD
from plural_cancel.config.settings import Settings
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ledger import Ledger
from tests.conftest import use_settings, wait_for
from tests.support.scripts import claim
from tests.support.workers import service_env, start_worker

QUEUE = Settings.cancel_queue


def ledger_for(client, **overrides) -> Ledger:
    options = {"result_ttl": 3600, "stall_timeout": 60.0, "rate": 10.0, "queue": QUEUE}
    return Ledger(client, keys=Keys(), **{**options, **overrides})


def test_a_held_cancel_costs_at_most_500_bytes_of_redis(redis_client):
    """Record, link and backlog entry together, measured as Redis counts them (``used_memory``)."""
    ledger = ledger_for(redis_client)
    count = 20_000
    pairs = [(str(uuid.uuid4()), f"pl_{n:012d}") for n in range(count)]
    before = redis_client.info("memory")["used_memory"]
    for start in range(0, count, 5000):
        assert set(ledger.create_many(pairs[start:start + 5000], hold=True)) == {1}
    per_cancel = (redis_client.info("memory")["used_memory"] - before) / count
    assert per_cancel <= 500, f"{per_cancel:.0f} bytes of Redis per pending cancel"
    assert redis_client.llen(QUEUE) == 0  # nothing in the broker
    assert ledger.stats()["backlog"] == count
    status = ledger.status(pairs[7][0])
    assert (status["request_id"], status["payment_link_id"], status["state"]) == (*pairs[7], "queued")
    assert status["attempts"] == 0 and status["created_at"] == status["updated_at"]


def test_the_pump_sends_due_cancels_first_then_fills_the_room_from_the_backlog(redis_client):
    """Room: ``ahead`` seconds at the account's rate, less its own cancels published and
    queued, or running (another account's messages in the queue take none of it)."""
    ledger = ledger_for(redis_client, stall_timeout=0.1)
    assert ledger.create_many([("due-first", "pl-due")]) == [1]  # published (as enqueue_cancel does)
    assert ledger.create_many([(f"held-{n:02d}", f"pl-held-{n:02d}") for n in range(50)], hold=True) == [1] * 50
    time.sleep(0.15)  # the published one's message is overdue: its recheck is due
    redis_client.rpush(QUEUE, *[b"x"] * 5)  # five messages of others already waiting
    taken = ledger.take_due(10, ahead=2.0)  # 10/s for 2 s: 20, less the published one
    assert taken[0] == ("due-first", "pl-due")
    assert [rid for rid, _ in taken[1:]] == [f"held-{n:02d}" for n in range(19)]  # oldest first
    assert ledger.stats()["backlog"] == 31
    assert ledger.take_due(10, ahead=2.0) == []  # taken ones count as queued until they run
    claim(ledger, "held-00", "pl-held-00", "owner", lease=30)
    assert ledger.take_due(10, ahead=2.0) == []  # running: still busy for the next 2 s
    # Taken from the backlog, a cancel is in the due index like any published one: a lost
    # message is found again after the stall timeout.
    assert redis_client.zscore(ledger.keys.due, "held-00") is not None


def test_the_pump_holds_the_backlog_back_while_the_breaker_is_open(redis_client):
    ledger = ledger_for(redis_client)
    ledger.create_many([(f"held-{n}", f"pl-held-{n}") for n in range(10)], hold=True)
    redis_client.hset(ledger.keys.breaker, mapping={"state": "open", "reopens_at": time.time() + 30})
    assert ledger.take_due(10, ahead=2.0) == []
    redis_client.delete(ledger.keys.breaker)
    assert len(ledger.take_due(10, ahead=2.0)) == 10


def test_a_held_cancel_that_ended_or_follows_is_skipped(redis_client):
    ledger = ledger_for(redis_client)
    assert ledger.create_many([("a", "pl-a"), ("b", "pl-b"), ("a2", "pl-a")], hold=True) == [1, 1, 2]
    # A message for "b" sent by name (send_task) claims it before the pump does.
    assert claim(ledger, "b", "pl-b", "owner", lease=30).verdict == "claimed"
    assert ledger.take_due(10, ahead=2.0) == [("a", "pl-a")]
    assert ledger.stats()["backlog"] == 0


def test_enqueue_many_holds_what_the_fleet_cannot_run_soon_and_enqueue_cancel_goes_at_once(redis_url):
    from plural_cancel.tasks.producer import enqueue_cancel, enqueue_many, get_status

    app = use_settings(redis_url, PLURAL_RATE_LIMIT="10")
    client = redis.Redis.from_url(redis_url)
    ids = enqueue_many([f"pl-bulk-{n:05d}" for n in range(3000)], app=app)
    room = int(app.runtime.ledger.rate * BACKLOG_AHEAD)  # two seconds at the paced 10/s: 19
    assert client.llen(QUEUE) == room
    assert client.llen(Keys().backlog) == 3000 - room
    assert {s["state"] for s in app.runtime.ledger.statuses(ids)} == {"queued"}
    single = enqueue_cancel("pl-urgent", app=app)  # an order expiring now does not wait its turn
    assert client.llen(QUEUE) == room + 1
    message = json.loads(client.lindex(QUEUE, 0))
    assert message["headers"]["kwargsrepr"].count(single) == 1
    assert get_status(single, app=app)["state"] == "queued"


@pytest.fixture(scope="module")
def draining(module_redis_url, sandbox_process):
    env = service_env(module_redis_url, sandbox_process.url, PLURAL_RATE_LIMIT="40")
    worker = start_worker(env, concurrency=16)
    yield module_redis_url, sandbox_process
    worker.stop()


@pytest.mark.slow
def test_a_worker_drains_a_backlog_with_the_queue_kept_short(draining):
    """400 links at 40/s: every one cancelled once, the broker's list never past the room
    (two seconds at the rate) plus what one pump tick per worker adds before it is read,
    plus the batch's first room that ``enqueue_many`` publishes itself: a pump tick that
    falls between its script and its publish does not see those yet (on a busy machine
    the list reached 142). Twice the room, never the backlog."""
    from plural_cancel.tasks.producer import enqueue_many

    redis_url, sandbox = draining
    app = use_settings(redis_url, sandbox.url, PLURAL_RATE_LIMIT="40")
    links = sandbox.create_links(400, status="CREATED", prefix="pl-backlog-")
    client = redis.Redis.from_url(redis_url)
    ids = enqueue_many(links, app=app)
    longest = 0

    def ended():
        nonlocal longest
        longest = max(longest, client.llen(QUEUE))
        states = [s["state"] for s in app.runtime.ledger.statuses(ids)]
        return all(state == "succeeded" for state in states)

    wait_for(ended, 60, interval=0.05, message="backlog drained")
    assert longest <= 80 + 40 + 80, longest
    puts = [r for r in sandbox.requests() if r["method"] == "PUT" and r.get("link_id", "").startswith("pl-backlog-")]
    assert len({r["link_id"] for r in puts}) == 400 and len(puts) == 400
    assert all(sandbox.link(link)["status"] == "CANCELLED" for link in links[:5])
    assert client.llen(Keys().backlog) == 0


def test_request_ids_made_in_bulk_are_uuid4_strings():
    from plural_cancel.tasks.producer import new_request_ids

    ids = new_request_ids(10_000)
    parsed = [uuid.UUID(rid) for rid in ids]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == rid for u, rid in zip(parsed, ids))
    assert len(set(ids)) == 10_000 and new_request_ids(0) == []
