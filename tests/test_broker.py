"""The broker transport (``worker.broker``): kombu's Redis transport with one client per channel."""

from __future__ import annotations

from tests.conftest import use_settings


def test_the_app_uses_it_and_a_channel_reuses_one_client(redis_url):
    from worker.broker import Transport

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
