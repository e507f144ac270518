"""The Plural client below HTTP: timeouts, resets, refused connections, TLS, a proxy, settings.

Against a real HTTP server on 127.0.0.1 (``tests/support/scripted_plural.py``), a real
forward proxy (``tests/support/forward_proxy.py``) and real sockets that refuse, stall
or never accept: the failures are what requests and urllib3 really do with them.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest

from plural_cancel.config.settings import Secret, Settings
from plural_cancel.errors import (
    PluralBadResponse,
    PluralConnectionError,
    PluralServerError,
    PluralTimeout,
    PluralTLSError,
    PluralUnexpectedAnswer,
)
from plural_cancel.worker.plural import MAX_BODY, PluralClient
from tests.support.forward_proxy import ForwardProxy
from tests.support.scripted_plural import (
    CLIENT_ID,
    LINK_ID,
    NOW,
    SECRET,
    SEED_200,
    Answer,
    RecordingStore,
    ScriptedPlural,
    self_signed_tls,
)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


def test_read_timeout(plural):
    plural.answers.append(Answer(200, SEED_200, delay=2.0))
    with PluralClient(plural.base_url, CLIENT_ID, SECRET, read_timeout=0.3) as client:
        with pytest.raises(PluralTimeout) as caught:
            client.cancel_payment_link(LINK_ID, "req-slow")
    assert caught.value.retryable and caught.value.request_id == "req-slow"
    assert caught.value.http_status is None
    assert caught.value.sent is True  # the PUT went out: Plural may have cancelled the link


def test_a_redirects_body_is_bound_by_the_deadline_too(plural, client):
    """requests' Session.send reads a redirect's whole body (to hand back ``response.next``)
    even with allow_redirects=False, past any deadline and any size cap: the client must not."""
    plural.answers.append(Answer(302, "x" * 40, {"Location": f"{plural.base_url}/elsewhere"}, trickle=0.2))
    started = time.monotonic()
    with client.within(1.0), pytest.raises(PluralTimeout):
        client.cancel_payment_link(LINK_ID, "req-302-slow")
    assert time.monotonic() - started < 2.0
    assert len(plural.calls()) == 1


def test_the_process_environment_is_not_read(plural, client, monkeypatch):
    """Settings read HTTPS_PROXY, NO_PROXY and the CA bundle once; the client never looks again."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    plural.answers.append(Answer(200, SEED_200))
    assert client.cancel_payment_link(LINK_ID, "req-env").status == "CANCELLED"


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


@pytest.mark.parametrize("inflated", [MAX_BODY + 1, 64 << 20])
def test_an_answer_past_the_size_cap_is_not_read(plural, client, inflated):
    """A gzip body of a few KB (65 KB for 64 MiB) is refused once it inflates past the cap,
    without ever holding more than about the cap in memory."""
    import gzip
    import tracemalloc

    bomb = gzip.compress(b" " * inflated, compresslevel=9)
    plural.answers.append(Answer(200, bomb, headers={"Content-Encoding": "gzip",
                                                     "Content-Type": "application/json"}))
    tracemalloc.start()
    try:
        with pytest.raises(PluralBadResponse, match="larger than") as caught:
            client.cancel_payment_link(LINK_ID, "req-bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_BODY, peak
    assert caught.value.http_status == 200 and not caught.value.retryable


def test_connection_reset(plural, client):
    plural.answers.append(Answer(reset=True))
    with pytest.raises(PluralConnectionError) as caught:
        client.cancel_payment_link(LINK_ID, "req-rst")
    assert not isinstance(caught.value, PluralTimeout)
    assert caught.value.retryable and caught.value.request_id == "req-rst"
    assert caught.value.sent is True


def test_connection_refused():
    with PluralClient(f"http://127.0.0.1:{closed_port()}/api", CLIENT_ID, SECRET) as client:
        with pytest.raises(PluralConnectionError) as caught:
            client.cancel_payment_link(LINK_ID, "req-refused")
    err = caught.value
    assert err.retryable and err.request_id == "req-refused" and "Generate Token failed" in err.message
    assert err.sent is False


# -- sent: whether the request may have reached Plural ------------------------------------
# Each kind is seen on the cancel's own PUT, its token already cached, so that ``sent``
# is the transport's verdict and not the token step's.

def cached_token_store() -> RecordingStore:
    from plural_cancel.worker.tokens import AccessToken

    store = RecordingStore()
    store.get(lambda: AccessToken("cached-token", NOW + 3600))
    return store


def put_error(base_url: str, **options):
    with PluralClient(base_url, CLIENT_ID, SECRET, tokens=cached_token_store(), clock=lambda: NOW,
                      **options) as client:
        with pytest.raises(Exception) as caught:
            client.cancel_payment_link(LINK_ID, "req-sent")
    assert caught.value.request_id == "req-sent" and "Generate Token" not in caught.value.message
    return caught.value


def test_refused_is_not_sent():
    err = put_error(f"http://127.0.0.1:{closed_port()}/api")
    assert type(err) is PluralConnectionError and err.retryable and err.sent is False


def test_an_unresolvable_host_is_not_sent():
    err = put_error("https://plural.invalid/api")
    assert type(err) is PluralConnectionError and err.retryable and err.sent is False


def test_a_connect_timeout_is_not_sent():
    """A listener whose backlog is full: the kernel drops our SYN, so connect() times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler = socket.create_connection(listener.getsockname())  # fills the backlog of one
        try:
            started = time.monotonic()
            err = put_error(f"http://127.0.0.1:{listener.getsockname()[1]}/api", connect_timeout=0.3)
            assert time.monotonic() - started < 2.0
        finally:
            filler.close()
    assert type(err) is PluralTimeout and err.retryable and err.sent is False
    assert "connect" in err.message


def test_a_failed_tls_handshake_is_not_sent(tmp_path):
    server = ScriptedPlural(tls=self_signed_tls(tmp_path))
    try:
        err = put_error(server.base_url)
    finally:
        server.close()
    assert type(err) is PluralTLSError and not err.retryable and err.sent is False and server.seen == []


@pytest.mark.parametrize("tls", [True, False])
def test_a_hang_up_after_the_request_was_sent(tmp_path, tls):
    """Plural (or a balancer) read the PUT and closed the connection unanswered."""
    server = ScriptedPlural(tls=self_signed_tls(tmp_path) if tls else None)
    server.answers.append(Answer(close=True))
    try:
        err = put_error(server.base_url, ca_bundle=str(tmp_path / "cert.pem"))
    finally:
        server.close()
    assert type(err) is PluralConnectionError and err.retryable and err.sent is True
    assert [seen.method for seen in server.seen] == ["PUT"]


def test_a_missing_ca_bundle_is_a_tls_error_and_not_sent(tmp_path):
    server = ScriptedPlural(tls=self_signed_tls(tmp_path))
    try:
        err = put_error(server.base_url, ca_bundle=str(tmp_path / "absent.pem"))
    finally:
        server.close()
    assert type(err) is PluralTLSError and not err.retryable and err.sent is False and server.seen == []


def test_a_refused_proxy_is_not_sent():
    err = put_error("https://plural.invalid/api", proxy_url=f"http://127.0.0.1:{closed_port()}")
    assert type(err) is PluralConnectionError and err.retryable and err.sent is False


def test_a_deadline_past_before_the_put_is_not_sent(plural):
    with PluralClient(plural.base_url, CLIENT_ID, SECRET, tokens=cached_token_store()) as client:
        with client.within(0.0), pytest.raises(PluralTimeout) as caught:
            client.cancel_payment_link(LINK_ID, "req-late")
    assert caught.value.sent is False and plural.seen == []


def test_a_token_that_would_split_the_headers_is_never_sent(plural, client):
    plural.token_answers.append(Answer(200, {"access_token": "tkn\r\nX-Injected: 1", "expires_in": 3600}))
    with pytest.raises(Exception) as caught:
        client.cancel_payment_link(LINK_ID, "req-crlf")
    assert type(caught.value).__name__ == "PluralError" and caught.value.sent is False
    assert "tkn" not in str(caught.value) and plural.calls() == []


def test_a_server_that_accepts_and_never_answers_was_sent():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, read by nobody
        err = put_error(f"http://127.0.0.1:{listener.getsockname()[1]}/api", read_timeout=0.3)
    assert type(err) is PluralTimeout and err.retryable and err.sent is True


def test_any_http_answer_was_sent(plural):
    plural.answers.append(Answer(503, {"code": "INTERNAL_ERROR", "message": "down"}))
    err = put_error(plural.base_url)
    assert type(err) is PluralServerError and err.sent is True


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
    """An http base (loopback only) through HTTP_PROXY: absolute-URI requests to the proxy."""
    plural.answers.append(Answer(200, SEED_200))
    with ForwardProxy() as proxy:
        with PluralClient(plural.base_url, CLIENT_ID, SECRET, proxy_url=proxy.url()) as client:
            assert client.cancel_payment_link(LINK_ID, "req-proxy").status == "CANCELLED"
        assert [(p.method, p.target) for p in proxy.passed] == [
            ("POST", f"{plural.base_url}/auth/v1/token"),
            ("PUT", f"{plural.base_url}/pay/v1/paymentlink/{LINK_ID}/cancel")]
    assert [seen.path for seen in plural.seen] == ["/api/auth/v1/token", f"/api/pay/v1/paymentlink/{LINK_ID}/cancel"]


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_proxy_credentials_from_the_proxy_url_are_sent(tmp_path, scheme):
    """HTTPS_PROXY=http://user:pw@host:port: requests sends Proxy-Authorization on the CONNECT
    (https base) or on every absolute-URI request (http base)."""
    server = ScriptedPlural(tls=self_signed_tls(tmp_path) if scheme == "https" else None)
    server.answers.append(Answer(200, SEED_200))
    try:
        with ForwardProxy(credentials=("svc-cancel", "pr0xy:p@ss")) as proxy:
            variable = "HTTPS_PROXY" if scheme == "https" else "HTTP_PROXY"
            settings = Settings.from_env({
                "PLURAL_BASE_URL": server.base_url, "PLURAL_CLIENT_ID": CLIENT_ID, "PLURAL_CLIENT_SECRET": SECRET,
                variable: proxy.url("svc-cancel:pr0xy%3Ap%40ss"), "REQUESTS_CA_BUNDLE": str(tmp_path / "cert.pem")})
            with PluralClient.from_settings(settings, clock=lambda: NOW) as client:
                assert client.cancel_payment_link(LINK_ID, "req-proxy-auth").status == "CANCELLED"
            expected = "Basic " + base64.b64encode(b"svc-cancel:pr0xy:p@ss").decode()
            assert proxy.passed and all(p.proxy_authorization == expected for p in proxy.passed)
            if scheme == "https":
                assert {p.method for p in proxy.passed} == {"CONNECT"}
        assert [seen.method for seen in server.seen] == ["POST", "PUT"]
        assert all(seen.headers.get("Proxy-Authorization") is None for seen in server.seen)
    finally:
        server.close()


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_proxy_refusing_the_login_never_shows_the_password(tmp_path, scheme, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    server = ScriptedPlural(tls=self_signed_tls(tmp_path) if scheme == "https" else None)
    try:
        with ForwardProxy(credentials=("svc-cancel", "right-pw")) as proxy:
            with PluralClient(server.base_url, CLIENT_ID, SECRET, proxy_url=proxy.url("svc-cancel:wr0ng-pw"),
                              ca_bundle=str(tmp_path / "cert.pem")) as client:
                with pytest.raises((PluralConnectionError, PluralUnexpectedAnswer)) as caught:
                    client.cancel_payment_link(LINK_ID, "req-407")
                shown = [str(caught.value), repr(caught.value), repr(client), caplog.text]
        err = caught.value
        assert err.retryable and err.request_id == "req-407"
        for text in shown:
            assert "wr0ng-pw" not in text
        assert server.seen == []
    finally:
        server.close()


def test_plain_http_to_a_host_other_than_loopback_is_refused():
    for base in ("http://plural.invalid/api", "http://10.1.2.3/api", "http://localhost.example/api"):
        with pytest.raises(ValueError, match="https"):
            PluralClient(base, CLIENT_ID, SECRET)
    for base in ("http://127.0.0.1:9/api", "http://localhost:9/api", "http://[::1]:9/api", "https://plural.invalid/api"):
        PluralClient(base, CLIENT_ID, SECRET).close()
