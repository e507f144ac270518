"""The Plural client below HTTP: timeouts, resets, refused connections, TLS, a proxy, settings.

Against a real HTTP server on 127.0.0.1 (``tests/support/scripted_plural.py``): the
failures are what urllib3 really does with them.
"""

from __future__ import annotations

import json
import socket

import pytest

from config.settings import Secret, Settings
from tests.support.scripted_plural import (CLIENT_ID, LINK_ID, NOW, SECRET, SEED_200, Answer, ScriptedPlural,
                                           self_signed_tls)
from worker.errors import PluralConnectionError, PluralTimeout, PluralTLSError
from worker.plural import PluralClient


def test_read_timeout(plural):
    plural.answers.append(Answer(200, SEED_200, delay=2.0))
    with PluralClient(plural.base_url, CLIENT_ID, SECRET, read_timeout=0.3) as client:
        with pytest.raises(PluralTimeout) as caught:
            client.cancel_payment_link(LINK_ID, "req-slow")
    assert caught.value.retryable and caught.value.request_id == "req-slow"
    assert caught.value.http_status is None


def test_an_attempt_deadline_bounds_a_trickled_body(plural):
    """urllib3's read timeout is per read: a body sent a byte every 0.4 s never trips a 1-s
    timeout. The attempt's deadline bounds the whole call all the same."""
    import time

    plural.answers.append(Answer(200, SEED_200, trickle=0.4))
    with PluralClient(plural.base_url, CLIENT_ID, SECRET, read_timeout=1.0) as client:
        started = time.monotonic()
        with client.within(2.0), pytest.raises(PluralTimeout) as caught:
            client.cancel_payment_link(LINK_ID, "req-trickled")
        took = time.monotonic() - started
    assert 1.5 < took < 3.0, took
    assert caught.value.retryable and caught.value.request_id == "req-trickled"


def test_an_answer_past_the_size_cap_is_not_read(plural, client):
    import gzip

    from worker.errors import PluralBadResponse
    from worker.plural import MAX_BODY

    bomb = gzip.compress(b" " * (MAX_BODY + 1))  # a few KB on the wire
    plural.answers.append(Answer(200, bomb, headers={"Content-Encoding": "gzip",
                                                     "Content-Type": "application/json"}))
    with pytest.raises(PluralBadResponse, match="larger than"):
        client.cancel_payment_link(LINK_ID, "req-bomb")


def test_connection_reset(plural, client):
    plural.answers.append(Answer(reset=True))
    with pytest.raises(PluralConnectionError) as caught:
        client.cancel_payment_link(LINK_ID, "req-rst")
    assert not isinstance(caught.value, PluralTimeout)
    assert caught.value.retryable and caught.value.request_id == "req-rst"


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with PluralClient(f"http://127.0.0.1:{port}/api", CLIENT_ID, SECRET) as client:
        with pytest.raises(PluralConnectionError) as caught:
            client.cancel_payment_link(LINK_ID, "req-refused")
    err = caught.value
    assert err.retryable and err.request_id == "req-refused" and "Generate Token failed" in err.message


@pytest.mark.parametrize("kind", ["untrusted certificate", "plain http behind https"])
def test_tls_failure_is_final(tmp_path, kind):
    server = ScriptedPlural(tls=self_signed_tls(tmp_path) if kind == "untrusted certificate" else None)
    try:
        base = server.base_url.replace("http://", "https://")
        with PluralClient(base, CLIENT_ID, SECRET) as client:
            with pytest.raises(PluralTLSError) as caught:
                client.cancel_payment_link(LINK_ID, "req-tls")
        assert not caught.value.retryable and caught.value.request_id == "req-tls"
        if kind == "untrusted certificate":
            assert "self-signed certificate" in caught.value.message
        assert server.seen == []
    finally:
        server.close()



# -- settings and proxies ----------------------------------------------------------------

def test_from_settings_uses_the_secret_and_timeouts(plural):
    settings = Settings(plural_base_url=plural.base_url, client_id=CLIENT_ID, client_secret=Secret(SECRET),
                        read_timeout=0.3)
    with PluralClient.from_settings(settings, clock=lambda: NOW) as client:
        assert client.generate_token().value == plural.issued[0]
        assert (client._connect_timeout, client._read_timeout) == (settings.connect_timeout, 0.3)
    assert json.loads(plural.token_calls()[0].body)["client_secret"] == SECRET


def test_calls_go_through_the_proxy_when_one_is_set(plural):
    """``plural`` plays the proxy: a host nobody can resolve is reached through it."""
    plural.answers.append(Answer(200, SEED_200))
    proxy = plural.base_url.removesuffix("/api")
    with PluralClient("http://plural.invalid/api", CLIENT_ID, SECRET, proxy_url=proxy) as client:
        assert client.cancel_payment_link(LINK_ID, "req-proxy").status == "CANCELLED"
    assert [seen.path.split("?")[0] for seen in plural.seen] == [
        "http://plural.invalid/api/auth/v1/token", f"http://plural.invalid/api/pay/v1/paymentlink/{LINK_ID}/cancel"]
