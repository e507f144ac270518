"""The Plural client against the sandbox over real HTTP: the two must agree on Plural's API."""

from __future__ import annotations

import pytest

from plural_cancel.errors import PluralAuthError, PluralRequestError, PluralServerError
from plural_cancel.sandbox import DEMO_PERSONAL_DATA, SandboxServer
from plural_cancel.worker.plural import PluralClient


@pytest.fixture
def server():
    with SandboxServer(client_id="cid", client_secret="secret-value") as srv:
        yield srv


@pytest.fixture
def client(server):
    with PluralClient(server.url, "cid", "secret-value", read_timeout=5) as c:
        yield c


def test_cancel_returns_the_whole_link(client, server):
    link = client.cancel_payment_link("pl-demo-created-02", "rid-1")
    assert link.status == "CANCELLED" and link.payment_link_id == "pl-demo-created-02"
    assert link.cancelled_at is not None and link.amount.currency == "INR"
    assert link.customer.email_id and link.customer.billing_address.address_type
    assert link.customer.email_id not in repr(link)  # personal data stays out of reprs and logs
    puts = [r for r in server.log.since(0) if r["method"] == "PUT"]
    assert [(p["path"], p["request_id"], p["status"]) for p in puts] == [
        ("/api/pay/v1/paymentlink/pl-demo-created-02/cancel", "rid-1", 200)]
    assert client.get_payment_link("pl-demo-created-02").status == "CANCELLED"


@pytest.mark.parametrize("link_id, status", [
    ("pl-demo-cancelled-01", 400), ("pl-demo-processed-01", 400), ("pl-demo-expired-01", 400),
    ("pl-demo-payment-initiated-01", 400), ("pl-v1-000000000000-aa-absent", 404),
])
def test_a_refused_cancel_is_a_request_error(client, link_id, status):
    with pytest.raises(PluralRequestError) as info:
        client.cancel_payment_link(link_id, "rid-2")
    assert info.value.http_status == status and not info.value.retryable
    assert info.value.request_id == "rid-2"


def test_a_revoked_token_is_replaced_once(client, server):
    client.get_payment_link("pl-demo-created-03")
    assert server.app.tokens.revoke_all() == 1
    client.get_payment_link("pl-demo-created-03")  # 401, new token, same call again
    token_calls = [r for r in server.log.since(0) if r["path"].endswith("/auth/v1/token")]
    assert len(token_calls) == 2


def test_wrong_credentials_are_an_auth_error(server):
    with PluralClient(server.url, "cid", "wrong") as bad:
        with pytest.raises(PluralAuthError) as info:
            bad.get_payment_link("pl-demo-created-01")
    assert info.value.http_status == 422 and info.value.code == "USER_AUTHENTICATION_FAILED"
    assert "wrong" not in str(info.value)


def test_an_outage_is_retryable(client, server):
    client.get_payment_link("pl-demo-created-04")  # a token first: the outage hits the token call too
    server.set_faults(outage=True)
    with pytest.raises(PluralServerError) as info:
        client.cancel_payment_link("pl-demo-created-04", "rid-3")
    assert info.value.http_status == 503 and info.value.retryable


def test_demo_personal_data_is_what_the_sandbox_serves(client):
    link = client.get_payment_link("pl-demo-created-05")
    assert link.customer.email_id in str(DEMO_PERSONAL_DATA)
