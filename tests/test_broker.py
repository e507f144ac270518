"""The broker transport (``worker.broker``): kombu's Redis transport with one client per channel."""

from __future__ import annotations

from tests.conftest import use_settings


def test_the_app_uses_it_and_a_channel_reuses_one_client(redis_url):
    from plural_cancel.worker.broker import Transport

    app = use_settings(redis_url, "http://127.0.0.1:9/api")
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        assert channel._create_client(asynchronous=True) is not first  # BRPOP's client is kombu's own
        # Messages still go through it: published, then read back by kombu.
        queue = conn.SimpleQueue("broker-test")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()


def test_a_synchronous_get_skips_items_that_are_not_kombu_messages(redis_url, redis_client, caplog):
    """``basic_get`` (kombu's ``_get``, RPOP) drops what the worker's BRPOP path drops (``test_malformed``)."""
    from plural_cancel.worker import malformed
    from plural_cancel.worker.keys import Keys

    app = use_settings(redis_url, "http://127.0.0.1:9/api")
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("broker-test-bad")
        redis_client.lpush("broker-test-bad", b"not json{", b"[1]")  # RPOP reads "not json{" first
        queue.put({"n": 2})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 2}
        message.ack()
        queue.close()
    dropped = [(r.levelname, r.queue, r.reason) for r in caplog.records if r.name == "plural_cancel.worker.broker"]
    assert dropped == [("ERROR", "broker-test-bad", "undecodable"), ("ERROR", "broker-test-bad", "not_a_task_message")]
    assert malformed.counts(redis_client, Keys()) == {**dict.fromkeys(malformed.REASONS, 0),
                                                      "undecodable": 1, "not_a_task_message": 1}
