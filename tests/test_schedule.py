"""Scheduled cancels in a real Redis: schedule, move, unschedule, fire; and the batch publish.

No worker here: firing is called directly and its effect read from the ledger and the
queue. ``tests/test_beat.py`` runs the same path with real beat and worker processes.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from plural_cancel.config.settings import Settings
from tests.conftest import use_settings

QUEUE = Settings.cancel_queue  # the queue list of every test's settings (CANCEL_QUEUE unset)


@pytest.fixture
def app(redis_url):
    return use_settings(redis_url)


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def records(redis_client) -> list[bytes]:
    return list(redis_client.scan_iter("plural-cancel:req:*", count=1000))


def test_schedule_keeps_one_entry_per_link_and_moves_it(app, redis_client):
    from plural_cancel.tasks import get_schedule, schedule_cancel

    first = schedule_cancel("pl-move-1", soon(600), app=app)
    at = soon(1200)
    again = schedule_cancel("pl-move-1", at, app=app)
    assert again == first  # moved, Request-ID kept
    assert redis_client.zcard("plural-cancel:schedule") == 1
    assert redis_client.zscore("plural-cancel:schedule", "pl-move-1") == pytest.approx(at.timestamp())
    info = get_schedule("pl-move-1", app=app)
    assert info["state"] == "scheduled" and info["request_id"] == first and info["fired_at"] is None
    assert info["at"] == at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    named = schedule_cancel("pl-move-1", at, request_id="order-9-expiry", app=app)
    assert named == "order-9-expiry"
    assert redis_client.zcard("plural-cancel:schedule") == 1
    assert schedule_cancel("pl-move-1", soon(60), app=app) == "order-9-expiry"
    # The replaced Request-ID is free again for another link.
    assert schedule_cancel("pl-move-2", at, request_id=first, app=app) == first


def test_an_offset_other_than_utc_is_the_same_instant(app, redis_client):
    from plural_cancel.tasks import schedule_cancel

    ist = timezone(timedelta(hours=5, minutes=30))
    at = datetime(2031, 1, 1, 5, 30, tzinfo=ist)
    schedule_cancel("pl-ist", at, app=app)
    utc = datetime(2031, 1, 1, tzinfo=timezone.utc)
    assert redis_client.zscore("plural-cancel:schedule", "pl-ist") == utc.timestamp()


@pytest.mark.parametrize("link_id, at, request_id, field", [
    ("pl-ok", datetime(2031, 1, 1), None, "at"),                   # naive
    ("pl-ok", "2031-01-01T00:00:00Z", None, "at"),                 # not a datetime
    ("pl-ok", 1924992000, None, "at"),
    ("pl ok", datetime(2031, 1, 1, tzinfo=timezone.utc), None, "payment_link_id"),
    ("", datetime(2031, 1, 1, tzinfo=timezone.utc), None, "payment_link_id"),
    ("pl-ok", datetime(2031, 1, 1, tzinfo=timezone.utc), "bad id", "request_id"),
    ("pl-ok", datetime(2031, 1, 1, tzinfo=timezone.utc), "r" * 51, "request_id"),
])
def test_bad_input_raises_naming_the_field_and_writes_nothing(app, redis_client, link_id, at, request_id, field):
    from plural_cancel.tasks import schedule_cancel

    before = redis_client.dbsize()
    with pytest.raises(ValueError, match=rf"^{field}:"):
        schedule_cancel(link_id, at, request_id=request_id, app=app)
    assert redis_client.dbsize() == before


def test_unschedule_validates_its_link_id(app):
    from plural_cancel.tasks import unschedule_cancel

    with pytest.raises(ValueError, match="^payment_link_id:"):
        unschedule_cancel("../etc", app=app)


def test_one_request_id_never_names_two_links(app):
    from plural_cancel.errors import RequestIdConflict
    from plural_cancel.tasks import enqueue_cancel, schedule_cancel

    schedule_cancel("pl-a", soon(600), request_id="shared-key", app=app)
    with pytest.raises(RequestIdConflict, match="request_id"):
        schedule_cancel("pl-b", soon(600), request_id="shared-key", app=app)
    enqueue_cancel("pl-c", request_id="used-now", app=app)
    with pytest.raises(RequestIdConflict, match="request_id"):
        schedule_cancel("pl-d", soon(600), request_id="used-now", app=app)


def test_unscheduled_in_time_never_fires(app, redis_client):
    from plural_cancel.tasks import get_schedule, schedule_cancel, unschedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    schedule_cancel("pl-paid", soon(-1), app=app)  # already due: only the firer has not run yet
    assert unschedule_cancel("pl-paid", app=app) is True
    assert unschedule_cancel("pl-paid", app=app) is False  # nothing left
    assert fire_schedules(app) == 0
    assert get_schedule("pl-paid", app=app) is None
    assert redis_client.llen(QUEUE) == 0 and records(redis_client) == []
    assert redis_client.hlen("plural-cancel:schedule:ids") == 0


def test_firing_goes_through_the_ledger_and_unschedule_then_reports_it(app, redis_client):
    from plural_cancel.tasks import get_schedule, get_status, schedule_cancel, unschedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    request_id = schedule_cancel("pl-due", soon(-0.5), app=app)
    later = schedule_cancel("pl-later", soon(600), app=app)
    assert fire_schedules(app) == 1
    status = get_status(request_id, app=app)
    assert (status["payment_link_id"], status["state"]) == ("pl-due", "queued")
    assert redis_client.llen(QUEUE) == 1
    assert redis_client.zscore("plural-cancel:due", request_id)  # carried by the due index until it ends
    info = get_schedule("pl-due", app=app)
    assert info["state"] == "fired" and info["request_id"] == request_id and info["fired_at"]
    assert info["result"] == "enqueued"
    assert 0 < redis_client.ttl("plural-cancel:schedule:fired:pl-due") <= app.settings.result_ttl
    assert unschedule_cancel("pl-due", app=app) is False
    assert fire_schedules(app) == 0  # nothing fires twice
    assert get_schedule("pl-later", app=app)["request_id"] == later
    assert redis_client.zrange("plural-cancel:schedule", 0, -1) == [b"pl-later"]


def test_a_request_id_that_already_cancelled_this_link_fires_as_a_no_op(app, redis_client):
    from plural_cancel.tasks import enqueue_cancel, get_schedule, schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    enqueue_cancel("pl-again", request_id="order-1-expiry", app=app)
    schedule_cancel("pl-again", soon(-1), request_id="order-1-expiry", app=app)
    assert fire_schedules(app) == 1
    assert get_schedule("pl-again", app=app)["result"] == "already_enqueued"
    assert redis_client.llen(QUEUE) == 1  # only enqueue_cancel's message
    assert len(records(redis_client)) == 1


def paused(the_app, seconds: float):
    """Every Redis command of ``the_app`` waits ``seconds`` first: a firer on a starved host."""
    pool = the_app.runtime.redis.connection_pool
    get_connection = pool.get_connection

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return get_connection(*args, **kwargs)

    pool.get_connection = slow
    return the_app


@pytest.mark.parametrize("unschedule_after", [0.2, 0.8, 1.4])
def test_unschedule_true_means_never_sent_whenever_the_firer_stalls(redis_url, redis_client, monkeypatch,
                                                                    unschedule_after):
    """A firer that stalls between any two of its Redis calls (0.5 s before each here, past
    the 0.2-s hold an old firer held its entries for) against an unschedule at three moments:
    True must mean no record and nothing sent, False that the cancel was or will be."""
    from plural_cancel.tasks import get_schedule, schedule_cancel, unschedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    monkeypatch.setattr("plural_cancel.tasks.periodic.HOLD", 0.2, raising=False)
    app = use_settings(redis_url)
    firer = paused(use_settings(redis_url), 0.5)
    request_id = schedule_cancel("pl-stall", soon(-1), app=app)
    thread = threading.Thread(target=fire_schedules, args=(firer,))
    thread.start()
    time.sleep(unschedule_after)
    removed = unschedule_cancel("pl-stall", app=app)
    thread.join(10)
    recorded = redis_client.exists(f"plural-cancel:req:{request_id}")
    if removed:
        assert not recorded and redis_client.llen(QUEUE) == 0 and redis_client.llen("plural-cancel:backlog") == 0
        assert get_schedule("pl-stall", app=app) is None
    else:
        assert recorded and get_schedule("pl-stall", app=app)["state"] == "fired"


def test_scheduled_again_after_it_fired_is_a_new_schedule(app, redis_client):
    from plural_cancel.tasks import get_schedule, schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    old = schedule_cancel("pl-twice", soon(-1), app=app)
    assert fire_schedules(app) == 1
    new = schedule_cancel("pl-twice", soon(600), app=app)
    assert new != old
    info = get_schedule("pl-twice", app=app)
    assert (info["state"], info["request_id"]) == ("scheduled", new)
    assert fire_schedules(app) == 0


def test_firers_running_at_once_fire_each_cancel_once(app, redis_client):
    from plural_cancel.tasks import schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    for i in range(300):
        schedule_cancel(f"pl-crowd-{i:03d}", soon(-1), app=app)
    counts, barrier = [], threading.Barrier(6)

    def fire():
        barrier.wait()
        counts.append(sum(fire_schedules(app) for _ in range(3)))

    threads = [threading.Thread(target=fire) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 300
    # Fired as a bulk enqueue: a few seconds' worth sent, the rest held; each cancel once.
    sent = [json.loads(base64.b64decode(json.loads(m)["body"]))[1]["request_id"]
            for m in redis_client.lrange(QUEUE, 0, -1)]
    held = [rid.decode() for rid in redis_client.lrange("plural-cancel:backlog", 0, -1)]
    assert 0 < len(sent) < 300 and len(sent) + len(held) == len(set(sent) | set(held)) == 300
    assert len(records(redis_client)) == 300
    assert redis_client.zcard("plural-cancel:schedule") == 0


def _stored(redis_client) -> dict:
    message = json.loads(redis_client.rpop(QUEUE))
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_a_batch_published_message_is_what_apply_async_stores_ids_aside(app, redis_client):
    from plural_cancel.tasks.cancel import cancel_payment_link
    from plural_cancel.worker.publisher import publish

    kwargs = {"payment_link_id": "pl-same", "request_id": "rid-same"}
    with app.producer_or_acquire() as producer:  # the task's own apply_async, onto this test's Redis
        cancel_payment_link.apply_async(kwargs=kwargs, producer=producer)
    ours_pairs = [("rid-same", "pl-same")]
    publish(app, ours_pairs)
    theirs, ours = _stored(redis_client), _stored(redis_client)
    assert ours["body"] == theirs["body"] == [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                                             "chord": None}]
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    assert ours["headers"]["id"] != theirs["headers"]["id"]
    assert ours["properties"]["delivery_tag"] != theirs["properties"]["delivery_tag"]
    for message in (ours, theirs):
        for field in ("id", "root_id"):
            message["headers"].pop(field)
        for field in ("correlation_id", "delivery_tag", "reply_to"):
            message["properties"].pop(field)
    assert ours == theirs


def test_publish_pushes_a_large_batch_in_order(app, redis_client):
    from plural_cancel.worker.publisher import PUBLISH_CHUNK, publish

    pairs = [(f"rid-{i}", f"pl-{i}") for i in range(PUBLISH_CHUNK * 2 + 7)]
    publish(app, pairs)
    assert redis_client.llen(QUEUE) == len(pairs)
    first = _stored(redis_client)  # BRPOP takes from the right: the oldest
    assert first["body"][1] == {"payment_link_id": "pl-0", "request_id": "rid-0"}
    ids = {json.loads(m)["headers"]["id"] for m in redis_client.lrange(QUEUE, 0, -1)}
    assert len(ids) == len(pairs) - 1


def test_a_request_id_scheduled_for_one_link_is_refused_for_another_at_once(app, redis_client):
    """One Request-ID, one link, across enqueue and schedule: the second call is refused."""
    from plural_cancel.tasks import enqueue_cancel, get_schedule, schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    schedule_cancel("pl-mine", soon(-1), request_id="taken-later", app=app)
    with pytest.raises(ValueError, match="request_id"):
        enqueue_cancel("pl-theirs", request_id="taken-later", app=app)
    assert redis_client.exists("plural-cancel:req:taken-later") == 0  # nothing written for pl-theirs
    assert fire_schedules(app) == 1
    assert get_schedule("pl-mine", app=app)["result"] == "enqueued"
    assert redis_client.llen(QUEUE) == 1  # only pl-mine
    assert redis_client.hget("plural-cancel:req:taken-later", "payment_link_id") == b"pl-mine"
    # And the other way round: a Request-ID enqueued for one link cannot be scheduled for another.
    enqueue_cancel("pl-first", request_id="enqueued-first", app=app)
    with pytest.raises(ValueError, match="request_id"):
        schedule_cancel("pl-second", soon(60), request_id="enqueued-first", app=app)


def test_a_skewed_host_clock_fires_nothing_early(redis_url, redis_client):
    """A firer whose host clock runs 120 s ahead fires by Redis's clock: not a minute early."""
    from plural_cancel.config.settings import Settings
    from plural_cancel.tasks import get_schedule, schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules
    from plural_cancel.worker import create_app
    from plural_cancel.worker.runtime import Runtime

    settings = Settings.from_env({"REDIS_URL": redis_url})
    the_app = create_app(settings, Runtime(settings, clock=lambda: time.time() + 120))
    try:
        schedule_cancel("pl-skewed", soon(60), app=the_app)
        assert fire_schedules(the_app) == 0
        assert get_schedule("pl-skewed", app=the_app)["state"] == "scheduled"
    finally:
        the_app.close()


def test_a_scheduled_cancel_carries_its_callback_when_it_fires(app, redis_client):
    """The callback given with the latest schedule_cancel of a link is the one its cancel carries."""
    from plural_cancel.tasks import schedule_cancel
    from plural_cancel.tasks.periodic import fire_schedules

    callback = {"callback": "orders.on_cancel_outcome", "callback_queue": "orders"}
    with_callback = schedule_cancel("pl-cb-at", soon(-1), **callback, app=app)
    moved_without = schedule_cancel("pl-cb-moved", soon(600), **callback, app=app)
    assert schedule_cancel("pl-cb-moved", soon(-1), app=app) == moved_without  # moved, and no callback now
    with pytest.raises(ValueError, match="callback_queue"):
        schedule_cancel("pl-cb-bad", soon(60), callback="orders.on_cancel_outcome", app=app)
    assert fire_schedules(app) == 2
    record = redis_client.hgetall(f"plural-cancel:req:{with_callback}")
    assert (record[b"callback"], record[b"callback_queue"]) == (b"orders.on_cancel_outcome", b"orders")
    assert b"callback" not in redis_client.hgetall(f"plural-cancel:req:{moved_without}")
    assert redis_client.exists("plural-cancel:schedule:link:pl-cb-bad") == 0
