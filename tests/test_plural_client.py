"""The Plural client against a real HTTP server on 127.0.0.1 whose answers each test scripts.

No mocking: every request crosses a real socket (``tests/support/scripted_plural.py``).
Failures below HTTP (timeouts, resets, TLS, proxies) are in ``test_plural_transport.py``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import email.utils
import json
import logging
import re
import threading
import uuid

import pytest

from plural_cancel.errors import (
    PluralAuthError,
    PluralBadResponse,
    PluralError,
    PluralRateLimited,
    PluralRequestError,
    PluralServerError,
    PluralUnexpectedAnswer,
)
from plural_cancel.worker.links import LINK_STATUSES, PaymentLink
from plural_cancel.worker.plural import PluralClient
from plural_cancel.worker.tokens import AccessToken, MemoryTokenStore
from tests.support.plural_create import create_payment_link
from tests.support.scripted_plural import CLIENT_ID, LINK_ID, NOW, NOW_STAMP, SECRET, SEED_200, UTC, Answer


def leak_free(*texts: str, tokens: list[str] = ()) -> None:
    for text in texts:
        assert SECRET not in text
        for token in tokens:
            assert token not in text


# -- the 200 answer ------------------------------------------------------------------

def test_cancel_sends_the_seed_request_and_parses_the_seed_answer(plural, client):
    plural.answers.append(Answer(200, SEED_200, {"Content-Type": "application/json"}))
    link = client.cancel_payment_link(LINK_ID, "req-1")

    token_call, put = plural.seen
    assert (token_call.method, token_call.path) == ("POST", "/api/auth/v1/token")
    assert json.loads(token_call.body) == {"client_id": CLIENT_ID, "client_secret": SECRET,
                                           "grant_type": "client_credentials"}
    assert token_call.headers.get("Authorization") is None
    assert token_call.headers["Request-Timestamp"] == NOW_STAMP
    assert token_call.headers["Request-ID"] not in ("", "req-1")

    assert (put.method, put.path) == ("PUT", f"/api/pay/v1/paymentlink/{LINK_ID}/cancel")
    assert put.headers["Authorization"] == f"Bearer {plural.issued[0]}"
    assert put.headers["Content-Type"] == "application/json"
    assert put.headers["Accept"] == "application/json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", put.headers["Request-Timestamp"])
    assert put.headers["Request-Timestamp"] == NOW_STAMP
    assert put.headers["Request-ID"] == "req-1"
    assert re.fullmatch(r"plural-cancel/\S+ python-requests/\S+", put.headers["User-Agent"])
    assert put.body == b"" and put.headers["Content-Length"] == "0"

    assert link.status == "CANCELLED" and link.status in LINK_STATUSES
    assert link.payment_link_id == LINK_ID
    assert link.payment_link == "https://shortener.v2.pinepg.in/PLUTUS/3rh4jtd"
    assert (link.amount.value, link.amount.currency) == (100, "INR")
    assert (link.amount_due.value, link.amount_due.currency) == (100, "INR")
    assert link.order_id == "v1-250131113650-aa-TUzeRY"
    assert link.merchant_payment_link_reference == link.merchant_order_reference == "link_ref"
    assert link.description == "Payment for order #12345"
    assert link.expire_by == dt.datetime(2025, 3, 21, 8, 29, tzinfo=UTC)
    assert link.allowed_payment_methods == ("NETBANKING",)
    stamp = dt.datetime(2025, 3, 6, 8, 27, 55, 881000, tzinfo=UTC)
    assert link.created_at == link.updated_at == link.cancelled_at == stamp
    c = link.customer
    assert (c.email_id, c.first_name, c.last_name) == ("kevin.bob@example.com", "Kevin", "Bob")
    assert (c.customer_id, c.mobile_number, c.country_code) == ("123456", "9876543210", "91")
    for address, category in ((c.billing_address, "billing"), (c.shipping_address, "shipping")):
        assert address.address1 == "10 Downing Street Westminster London"
        assert address.address2 == "Oxford Street Westminster London"
        assert address.address3 == "Baker Street Westminster London"
        assert (address.pincode, address.city, address.state) == ("51524036", "Westminster", "Westminster")
        assert (address.country, address.full_name) == ("London", "Kevin Bob")
        assert address.address_type == "Home"  # read from the seed's "adddress_type"
        assert address.address_category == category
    (product,) = link.product_details
    assert product.product_code == "xyz"
    assert (product.product_amount.value, product.product_amount.currency) == (1200000, "INR")
    assert product.product_coupon_discount_amount.value == 0
    assert link.cart_coupon_discount_amount.value == 0
    assert link.merchant_metadata["tenant_id"] == "PGATPOS"
    assert link.merchant_metadata["OfferData"].startswith("UHJvZHVjdF9Db2Rl")
    assert len(link.merchant_metadata) == 9 and link.extra == {}
    shown = repr(link)
    for pii in ("kevin", "Kevin", "9876543210", "Downing", "51524036", "Payment for order"):
        assert pii not in shown


def test_a_puts_request_timestamp_is_the_reading_held_to_its_send_by_time(plural, store):
    """The rate limit holds a PUT to leave by its slot's send-by time; the reading checked
    is the one sent as ``Request-Timestamp``, so Plural is told the sending the limit allowed.
    A reading past it sends nothing (``SlotMissed``)."""
    import time

    from plural_cancel.errors import SlotMissed

    readings: list[float] = []
    with PluralClient(plural.base_url, CLIENT_ID, SECRET, tokens=store, clock=lambda: readings.pop(0)) as c:
        store.get(lambda: AccessToken("tkn-cached", NOW + 3600))  # no token call: the readings are ours
        plural.answers.append(Answer(200, SEED_200, {"Content-Type": "application/json"}))
        # send_by 15 ms from the first reading; the reading before the PUT is 10 ms on.
        readings[:] = [NOW, NOW + 0.010]
        with c.within(5, send_by=time.monotonic() + 0.015):
            c.cancel_payment_link(LINK_ID, "req-on-time")
        readings[:] = [NOW, NOW + 0.020]
        with pytest.raises(SlotMissed), c.within(5, send_by=time.monotonic() + 0.015):
            c.cancel_payment_link(LINK_ID, "req-late")
    assert [(seen.headers["Request-ID"], seen.headers["Request-Timestamp"]) for seen in plural.seen] == [
        ("req-on-time", "2024-07-09T07:57:08.032Z")]  # the reading checked; nothing sent late


def test_token_is_reused_and_get_and_create_use_their_paths(plural, client):
    plural.answers.extend([Answer(200, {"status": "CREATED", "payment_link_id": LINK_ID}),
                           Answer(200, {"status": "CREATED", "payment_link_id": LINK_ID, "new": 1})])
    created = create_payment_link(client, 5000, "order_42", request_id="req-c", description="d")
    fetched = client.get_payment_link(LINK_ID)
    assert len(plural.token_calls()) == 1
    post, get = plural.calls()
    assert (post.method, post.path) == ("POST", "/api/pay/v1/paymentlink")
    assert json.loads(post.body) == {"amount": {"value": 5000, "currency": "INR"},
                                     "merchant_payment_link_reference": "order_42", "description": "d"}
    assert (get.method, get.path, get.body) == ("GET", f"/api/pay/v1/paymentlink/{LINK_ID}", b"")
    assert uuid.UUID(get.headers["Request-ID"])
    assert created.status == "CREATED" and fetched.extra == {"new": 1} and fetched.customer is None


def test_put_and_create_carry_the_request_id_as_idempotency_key_get_and_token_do_not(plural, client):
    plural.answers.extend([Answer(200, {"status": "CREATED", "payment_link_id": LINK_ID}),
                           Answer(200, {"status": "CREATED", "payment_link_id": LINK_ID}),
                           Answer(200, SEED_200)])
    create_payment_link(client, 5000, "order_43", request_id="req-create")
    client.get_payment_link(LINK_ID, "req-get")
    client.cancel_payment_link(LINK_ID, "req-put")
    (token,) = plural.token_calls()
    post, get, put = plural.calls()
    assert post.headers["Idempotency-Key"] == post.headers["Request-ID"] == "req-create"
    assert put.headers["Idempotency-Key"] == put.headers["Request-ID"] == "req-put"
    assert get.headers.get("Idempotency-Key") is None and token.headers.get("Idempotency-Key") is None


def test_model_tolerates_spellings_numbers_offsets_and_absent_fields():
    link = PaymentLink.from_dict({
        "status": "EXPIRED", "amount": {"value": 100.0, "currency": "INR"}, "amount_due": {"currency": "INR"},
        "expire_by": "2025-03-21T13:59+05:30", "created_at": "2025-03-06T08:27:55",
        "updated_at": "2025-03-06T08:27:55.881123Z", "cancelled_at": None, "product_details": None,
        "customer": {"mobile_number": 9876543210, "billing_address": {"address_type": "Work", "pincode": 560001}},
    })
    assert (link.amount.value, link.amount_due.value) == (100, 0)
    assert link.expire_by == dt.datetime(2025, 3, 21, 8, 29, tzinfo=UTC)
    assert link.created_at == dt.datetime(2025, 3, 6, 8, 27, 55, tzinfo=UTC)
    assert link.updated_at.microsecond == 881123 and link.cancelled_at is None
    assert link.customer.mobile_number == "9876543210" and link.customer.shipping_address is None
    assert (link.customer.billing_address.address_type, link.customer.billing_address.pincode) == ("Work", "560001")
    assert link.product_details == () and link.payment_link_id is None
    assert isinstance(hash(link), int)  # frozen and hashable despite its dict fields


# -- error answers ----------------------------------------------------------------------

OMS = {"source": "OMS", "step": "PAYMENT_CREATION"}


@pytest.mark.parametrize("status, body, headers, cls, code, details, retry_after", [
    (400, {"code": "INVALID_REQUEST", "message": "bad link"}, {}, PluralRequestError, "INVALID_REQUEST", {}, None),
    (404, {"code": "NOT_FOUND", "message": "no such link"}, {}, PluralRequestError, "NOT_FOUND", {}, None),
    (422, {"code": "DUPLICATE_REQUEST", "message": "already processed"}, {}, PluralRequestError,
     "DUPLICATE_REQUEST", {}, None),
    (429, {"code": "RATE_LIMITED", "message": "slow down"}, {"Retry-After": "7"}, PluralRateLimited,
     "RATE_LIMITED", {}, 7.0),
    (500, {"code": "INTERNAL_ERROR", "message": "failed", "additionalErrorPayload": OMS}, {},
     PluralServerError, "INTERNAL_ERROR", OMS, None),
    (500, {"code": "INTERNAL_ERROR", "message": "failed", "additional_error_details": OMS}, {},
     PluralServerError, "INTERNAL_ERROR", OMS, None),
    (503, {"code": "INTERNAL_ERROR", "message": "down"}, {"Retry-After": "30"}, PluralServerError,
     "INTERNAL_ERROR", {}, 30.0),
])
def test_error_answers_are_classified(plural, client, status, body, headers, cls, code, details, retry_after):
    plural.answers.append(Answer(status, body, headers))
    with pytest.raises(cls) as caught:
        client.cancel_payment_link(LINK_ID, "req-err")
    err = caught.value
    assert (err.http_status, err.code, err.message, err.details) == (status, code, body["message"], details)
    assert err.request_id == "req-err" and err.retry_after == retry_after
    assert err.retryable == (status >= 429)
    assert len(plural.calls()) == 1  # the client never retries by itself


def test_429_with_an_http_date(plural, client):
    when = email.utils.formatdate(NOW + 120, usegmt=True)
    plural.answers.append(Answer(429, {"code": "RATE_LIMITED", "message": "later"}, {"Retry-After": when}))
    with pytest.raises(PluralRateLimited) as caught:
        client.cancel_payment_link(LINK_ID, "req-429")
    assert caught.value.retry_after == pytest.approx(120, abs=1) and caught.value.retryable


def test_html_502_is_a_retryable_server_error_without_the_body(plural, client):
    html = "<html><body>Bad Gateway kevin.bob@example.com</body></html>"
    plural.answers.append(Answer(502, html, {"Content-Type": "text/html; charset=utf-8"}))
    with pytest.raises(PluralServerError) as caught:
        client.cancel_payment_link(LINK_ID, "req-502")
    err = caught.value
    assert err.retryable and err.http_status == 502 and err.code is None and err.request_id == "req-502"
    assert f"body is not JSON (text/html, {len(html)} bytes)" in str(err)
    assert "kevin" not in str(err) and "Bad Gateway" not in str(err)


@pytest.mark.parametrize("body, headers, words", [
    ('{"status": "CANCELLED", "payment_li', {"Content-Type": "application/json"}, "not JSON (application/json"),
    ("", {}, "body is empty"),
    ("<html>ok</html>", {"Content-Type": "text/html"}, "not JSON (text/html, 15 bytes)"),
    ([{"status": "CANCELLED"}], {}, "must be a JSON object, not list"),
    ({"payment_link_id": LINK_ID}, {}, "no status"),
    ({"status": 7}, {}, "status must be a non-empty string"),
])
def test_unreadable_200_is_a_bad_response(plural, client, body, headers, words):
    plural.answers.append(Answer(200, body, headers))
    with pytest.raises(PluralBadResponse) as caught:
        client.cancel_payment_link(LINK_ID, "req-bad")
    err = caught.value
    assert words in err.message and err.http_status == 200 and err.request_id == "req-bad"
    assert not err.retryable and "kevin" not in str(err) and "payment_li" not in str(err)


@pytest.mark.parametrize("body, field", [
    ({"status": "CANCELLED", "amount": {"value": "100", "currency": "INR"}}, "amount"),
    ({"status": "CANCELLED", "customer": ["kevin"]}, "customer"),
    ({"status": "cancelled", "cancelled_at": "yesterday"}, "cancelled_at"),
])
def test_a_200_with_a_field_that_does_not_parse_keeps_it_out_of_the_link(plural, client, body, field):
    """Only the status decides: a field that cannot be read is set aside, raw, by name."""
    plural.answers.append(Answer(200, body, {"Content-Type": "application/json"}))
    link = client.cancel_payment_link(LINK_ID, "req-odd")
    assert link.status == "CANCELLED" and link.unreadable == (field,)
    assert getattr(link, field) is None and link.extra[field] == body[field]
    assert "kevin" not in repr(link)


@pytest.mark.parametrize("status, body, headers, words", [
    (204, "", {}, "body is empty"),
    (201, "", {}, "body is empty"),
    (202, "accepted", {"Content-Type": "text/plain"}, "not JSON (text/plain, 8 bytes)"),
    (200, "   ", {"Content-Type": "application/json"}, "body is empty"),
])
def test_a_2xx_without_json_is_a_bad_response_with_its_status(plural, client, status, body, headers, words):
    """The cancel task reads a link's state from a GET when the PUT's 2xx cannot be read."""
    plural.answers.append(Answer(status, body, headers))
    with pytest.raises(PluralBadResponse) as caught:
        client.cancel_payment_link(LINK_ID, "req-2xx")
    err = caught.value
    assert words in err.message and err.http_status == status and not err.retryable and err.sent


def test_a_redirect_is_not_followed(plural, client):
    plural.answers.append(Answer(302, "", {"Location": f"{plural.base_url}/elsewhere"}))
    with pytest.raises(PluralBadResponse) as caught:
        client.cancel_payment_link(LINK_ID, "req-302")
    assert caught.value.http_status == 302 and "redirect" in caught.value.message
    assert len(plural.calls()) == 1


WAF_PAGE = "<html><body>Request blocked kevin.bob@example.com</body></html>"


@pytest.mark.parametrize("method", ["PUT", "GET"])
@pytest.mark.parametrize("status, body, headers, note", [
    (403, WAF_PAGE, {"Content-Type": "text/html"}, f"body is not JSON (text/html, {len(WAF_PAGE)} bytes)"),
    (404, "404 page not found", {"Content-Type": "text/plain; charset=utf-8"},
     "body is not JSON (text/plain, 18 bytes)"),
    (407, "", {"Proxy-Authenticate": 'Basic realm="corp"'}, "body is empty"),
    (400, {"error": "Bad Request", "path": "/pay"}, {}, "not Plural's error shape"),
])
def test_a_4xx_that_is_not_plurals_word_is_retryable(plural, client, method, status, body, headers, note):
    """A WAF's page, a misrouted path's 404 or a proxy's 407 says nothing about the link."""
    plural.answers.append(Answer(status, body, headers))
    call = client.cancel_payment_link if method == "PUT" else client.get_payment_link
    with pytest.raises(PluralUnexpectedAnswer) as caught:
        call(LINK_ID, "req-waf")
    err = caught.value
    assert err.retryable and err.sent and (err.http_status, err.code, err.request_id) == (status, None, "req-waf")
    assert f"HTTP {status}" in err.message and note in err.message
    assert "kevin" not in str(err) and "blocked" not in str(err) and "page not found" not in str(err)
    assert [c.method for c in plural.calls()] == [method]


@pytest.mark.parametrize("method", ["PUT", "GET"])
@pytest.mark.parametrize("status, body", [
    (400, {"code": "INVALID_REQUEST", "message": "link cannot be cancelled"}),
    (404, {"code": "NOT_FOUND", "message": "no such link", "additional_error_details": OMS}),
    (422, {"code": "DUPLICATE_REQUEST", "message": "already processed", "additionalErrorPayload": OMS}),
])
def test_a_4xx_in_plurals_error_shape_stays_final(plural, client, method, status, body):
    plural.answers.append(Answer(status, body))
    call = client.cancel_payment_link if method == "PUT" else client.get_payment_link
    with pytest.raises(PluralRequestError) as caught:
        call(LINK_ID, "req-final")
    assert not caught.value.retryable and caught.value.code == body["code"]


# -- the 401 dance ----------------------------------------------------------------------

def test_401_drops_the_token_and_retries_once_with_the_same_request_id(plural, client, store):
    plural.answers.extend([Answer(401, {"code": "UNAUTHORIZED", "message": "expired"}),
                           Answer(200, SEED_200)])
    assert client.cancel_payment_link(LINK_ID, "req-401").status == "CANCELLED"
    first, second = plural.calls()
    assert store.invalidated == [plural.issued[0]]
    assert len(plural.token_calls()) == 2
    assert first.headers["Request-ID"] == second.headers["Request-ID"] == "req-401"
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "req-401"
    assert first.headers["Authorization"] == f"Bearer {plural.issued[0]}"
    assert second.headers["Authorization"] == f"Bearer {plural.issued[1]}"


def test_401_twice_is_an_auth_error(plural, client, store, caplog):
    caplog.set_level(logging.DEBUG)
    plural.answers.extend([Answer(401, {"code": "UNAUTHORIZED", "message": "expired"}),
                           Answer(401, {"code": "UNAUTHORIZED", "message": "still bad"})])
    with pytest.raises(PluralAuthError) as caught:
        client.cancel_payment_link(LINK_ID, "req-401x2")
    err = caught.value
    assert (err.http_status, err.code, err.request_id, err.retryable) == (401, "UNAUTHORIZED", "req-401x2", False)
    assert len(plural.calls()) == 2 and len(plural.token_calls()) == 2
    assert store.invalidated == [plural.issued[0]]
    leak_free(str(err), repr(err), caplog.text, repr(client), tokens=plural.issued)
    assert "PUT /pay/v1/paymentlink/" in caplog.text and "req-401x2" in caplog.text


@pytest.mark.parametrize("status, code", [(422, "USER_AUTHENTICATION_FAILED"), (403, "UNAUTHORIZED"),
                                          (400, "USER_AUTHENTICATION_FAILED")])
def test_an_auth_code_in_any_4xx_is_a_rejected_token(plural, client, store, status, code):
    plural.answers.extend([Answer(status, {"code": code, "message": "token not valid"}), Answer(200, SEED_200)])
    assert client.cancel_payment_link(LINK_ID, "req-422").status == "CANCELLED"
    first, second = plural.calls()
    assert store.invalidated == [plural.issued[0]] and len(plural.token_calls()) == 2
    assert first.headers["Request-ID"] == second.headers["Request-ID"] == "req-422"
    assert second.headers["Idempotency-Key"] == "req-422"
    assert second.headers["Authorization"] == f"Bearer {plural.issued[1]}"


def test_an_auth_code_twice_is_an_auth_error(plural, client, store):
    plural.answers.extend([Answer(422, {"code": "USER_AUTHENTICATION_FAILED", "message": "no"}),
                           Answer(422, {"code": "USER_AUTHENTICATION_FAILED", "message": "still no"})])
    with pytest.raises(PluralAuthError) as caught:
        client.cancel_payment_link(LINK_ID, "req-422x2")
    err = caught.value
    assert (err.http_status, err.code, err.retryable, err.sent) == (422, "USER_AUTHENTICATION_FAILED", False, True)
    assert len(plural.calls()) == 2 and len(plural.token_calls()) == 2


def test_an_account_problem_is_not_fixed_by_a_new_token(plural, client, store):
    """INVALID_USER_ACCOUNT names the merchant's account, not the token: one call, final."""
    plural.answers.append(Answer(422, {"code": "INVALID_USER_ACCOUNT", "message": "account disabled"}))
    with pytest.raises(PluralAuthError) as caught:
        client.cancel_payment_link(LINK_ID, "req-acct")
    assert caught.value.code == "INVALID_USER_ACCOUNT" and not caught.value.retryable
    assert len(plural.calls()) == 1 and len(plural.token_calls()) == 1 and store.invalidated == []


# -- input validation -----------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "a/b", "pl 1", "x" * 51, "", "pl\n", None, 42])
def test_bad_link_ids_send_nothing(plural, client, bad):
    for call in (lambda: client.cancel_payment_link(bad, "req-1"), lambda: client.get_payment_link(bad)):
        with pytest.raises(ValueError, match="payment_link_id"):
            call()
    assert plural.seen == []


@pytest.mark.parametrize("bad", ["", "r" * 51, "a b", "a/b", "ü", None])
def test_bad_request_ids_send_nothing(plural, client, bad):
    with pytest.raises(ValueError, match="request_id"):
        client.cancel_payment_link(LINK_ID, bad)
    assert plural.seen == []


def test_50_char_ids_are_accepted(plural, client):
    plural.answers.append(Answer(200, {"status": "CANCELLED"}))
    assert client.cancel_payment_link("p" * 50, "r" * 50).status == "CANCELLED"
    assert plural.calls()[0].path == f"/api/pay/v1/paymentlink/{'p' * 50}/cancel"


# -- Generate Token ---------------------------------------------------------------------

@pytest.mark.parametrize("answer, expires_at", [
    ({"access_token": "t", "expires_at": "2024-08-28T15:00:12.213Z"},
     calendar.timegm((2024, 8, 28, 15, 0, 12)) + 0.213),
    ({"access_token": "t", "expires_at": "2024-08-28T15:00Z"}, calendar.timegm((2024, 8, 28, 15, 0, 0))),
    ({"access_token": "t", "expires_at": "2024-08-28T15:00:12+00:00"}, calendar.timegm((2024, 8, 28, 15, 0, 12))),
    ({"access_token": "t", "expires_in": 3600}, None),
])
def test_generate_token_reads_either_expiry(plural, client, answer, expires_at):
    """As Plural gave it: the store judges an ``expires_at`` on its own clock (Redis's)."""
    plural.token_answers.append(Answer(200, answer))
    token = client.generate_token()
    if expires_at is None:
        assert token.expires_at is None and 3599 < token.expires_in <= 3600  # less the time in transit
    else:
        assert token == AccessToken("t", pytest.approx(expires_at))
    assert "'t'" not in repr(token)


@pytest.mark.parametrize("status, code", [(422, "USER_AUTHENTICATION_FAILED"), (401, "UNAUTHORIZED")])
def test_refused_credentials_are_a_final_auth_error(plural, client, status, code, caplog):
    caplog.set_level(logging.DEBUG)
    plural.token_answers.append(Answer(status, {"code": code, "message": f"client_secret {SECRET} is wrong"}))
    with pytest.raises(PluralAuthError) as caught:
        client.cancel_payment_link(LINK_ID, "req-auth")
    err = caught.value
    assert (err.http_status, err.code, err.retryable, err.request_id) == (status, code, False, "req-auth")
    assert plural.calls() == []
    leak_free(str(err), repr(err), caplog.text, repr(client))


def test_token_outage_is_retryable_and_no_put_is_sent(plural, client):
    plural.token_answers.append(Answer(503, {"code": "INTERNAL_ERROR", "message": "down"}, {"Retry-After": "5"}))
    with pytest.raises(PluralServerError) as caught:
        client.cancel_payment_link(LINK_ID, "req-tok503")
    err = caught.value
    assert err.retryable and err.retry_after == 5.0 and err.request_id == "req-tok503"
    assert err.message.startswith("Generate Token failed") and plural.calls() == []
    assert err.sent is False  # the cancel's PUT never left: the task does not count an attempt


def test_a_token_failure_after_a_401_was_sent(plural, client):
    """The PUT reached Plural (and got a 401) before the new token failed."""
    plural.answers.append(Answer(401, {"code": "UNAUTHORIZED", "message": "expired"}))
    plural.token_answers.extend([Answer(200, {"access_token": "t1", "expires_in": 3600}),
                                 Answer(503, {"code": "INTERNAL_ERROR", "message": "down"})])
    with pytest.raises(PluralServerError) as caught:
        client.cancel_payment_link(LINK_ID, "req-401-503")
    assert caught.value.message.startswith("Generate Token failed") and caught.value.sent is True
    assert len(plural.calls()) == 1


def test_a_token_answer_that_is_not_plurals_word_is_retryable(plural, client):
    plural.token_answers.append(Answer(403, "<html>blocked</html>", {"Content-Type": "text/html"}))
    with pytest.raises(PluralUnexpectedAnswer) as caught:
        client.cancel_payment_link(LINK_ID, "req-tok403")
    assert caught.value.retryable and caught.value.sent is False and plural.calls() == []


def test_token_without_access_token_is_a_bad_response(plural, client):
    plural.token_answers.append(Answer(200, {"expires_in": 3600}))
    with pytest.raises(PluralBadResponse, match="access_token"):
        client.generate_token()


def test_missing_credentials_send_nothing(plural):
    with PluralClient(plural.base_url, None, None) as client:
        with pytest.raises(PluralAuthError, match="PLURAL_CLIENT_ID"):
            client.cancel_payment_link(LINK_ID, "req-1")
    assert plural.seen == []


# -- the in-process token store ----------------------------------------------------------

def test_memory_store_refreshes_60s_before_expiry_and_drops_only_the_rejected_token():
    now = [1000.0]
    store = MemoryTokenStore(clock=lambda: now[0])
    fetched = []

    def fetch():
        fetched.append(AccessToken(f"t{len(fetched)}", now[0] + 3600))
        return fetched[-1]

    assert store.get(fetch) == "t0"
    now[0] += 3539
    assert store.get(fetch) == "t0"
    now[0] += 2  # 59 s before expiry: stale
    assert store.get(fetch) == "t1"
    store.invalidate("t0")  # a late 401 for an old token leaves the new one alone
    assert store.get(fetch) == "t1"
    store.invalidate("t1")
    assert store.get(fetch) == "t2"


def test_memory_store_fetches_once_for_many_threads():
    store = MemoryTokenStore()
    calls = []
    gate = threading.Event()

    def fetch():
        calls.append(1)
        gate.wait(0.2)
        return AccessToken("shared", 1e12)

    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get(fetch))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["shared"] * 8 and len(calls) == 1


def test_errors_survive_pickling_for_celery():
    import pickle
    err = PluralRateLimited("slow", http_status=429, code="RATE_LIMITED", request_id="r", retry_after=7.0)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.http_status, back.retry_after, back.request_id) == (PluralRateLimited, 429, 7.0, "r")
    assert isinstance(back, PluralError)
