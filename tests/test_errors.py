"""The one retryability decision (classify_http) and the Retry-After parser."""

from __future__ import annotations

import email.utils
import pickle

import pytest

from plural_cancel.errors import (
    PluralAuthError,
    PluralBadResponse,
    PluralConnectionError,
    PluralError,
    PluralRateLimited,
    PluralRequestError,
    PluralServerError,
    PluralTimeout,
    PluralTLSError,
    PluralUnexpectedAnswer,
    TokenUnavailable,
)
from plural_cancel.worker.classify import classify_http, parse_retry_after

NOW = 1_720_511_828.0
OMS = {"source": "OMS", "step": "PAYMENT_CREATION"}


# -- parse_retry_after -----------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("7", 7.0), (" 7 ", 7.0), ("0", 0.0), ("120", 120.0), ("1.5", 1.5),
    (None, None), ("", None), ("soon", None), ("-3", None), ("7s", None), ("Mon, 99 Foo", None),
])
def test_retry_after_seconds_and_garbage(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_http_date():
    assert parse_retry_after(email.utils.formatdate(NOW + 90, usegmt=True), now=NOW) == pytest.approx(90)
    assert parse_retry_after("Tue, 09 Jul 2024 08:00:00 GMT", now=NOW) == pytest.approx(172)
    # "-0000" parses to a naive datetime; it must still be read as UTC.
    assert parse_retry_after("Tue, 09 Jul 2024 08:00:00 -0000", now=NOW) == pytest.approx(172)


def test_retry_after_date_in_the_past_is_zero():
    assert parse_retry_after(email.utils.formatdate(NOW - 60, usegmt=True), now=NOW) == 0.0


# -- classify_http ---------------------------------------------------------------------

@pytest.mark.parametrize("status, body, cls, retryable", [
    (400, {"code": "INVALID_REQUEST", "message": "bad"}, PluralRequestError, False),
    (401, {"code": "UNAUTHORIZED", "message": "token expired"}, PluralAuthError, False),
    (403, {"code": "FORBIDDEN", "message": "no"}, PluralRequestError, False),
    (404, {"code": "NOT_FOUND", "message": "no such link"}, PluralRequestError, False),
    (408, None, PluralTimeout, True),
    (409, {"code": "CONFLICT", "message": "busy"}, PluralRequestError, False),
    (422, {"code": "DUPLICATE_REQUEST", "message": "already processed"}, PluralRequestError, False),
    (422, {"code": "USER_AUTHENTICATION_FAILED", "message": "bad credentials"}, PluralAuthError, False),
    (422, {"code": "INVALID_USER_ACCOUNT", "message": "no account"}, PluralAuthError, False),
    (429, {"code": "RATE_LIMITED", "message": "slow down"}, PluralRateLimited, True),
    (500, {"code": "INTERNAL_ERROR", "message": "failed"}, PluralServerError, True),
    (502, None, PluralServerError, True),
    (503, {"code": "INTERNAL_ERROR", "message": "down"}, PluralServerError, True),
    (504, None, PluralServerError, True),
    (301, None, PluralBadResponse, False),
    (302, {}, PluralBadResponse, False),
])
def test_status_decides_class_and_retryability(status, body, cls, retryable):
    err = classify_http(status, body, request_id="req-1")
    assert type(err) is cls and err.retryable is retryable
    assert err.http_status == status and err.request_id == "req-1"
    if body:
        assert (err.code, err.message) == (body["code"], body["message"])


@pytest.mark.parametrize("name", ["additionalErrorPayload", "additional_error_details"])
def test_details_under_either_name(name):
    err = classify_http(500, {"code": "INTERNAL_ERROR", "message": "failed because...", name: OMS})
    assert err.details == OMS and err.code == "INTERNAL_ERROR" and err.message == "failed because..."


@pytest.mark.parametrize("body", [None, [], ["x"], "text", 42, {"code": 5, "message": ["m"]},
                                  {"additionalErrorPayload": "not an object"}, {}])
def test_odd_bodies_still_give_a_clear_error(body):
    err = classify_http(500, body, request_id="r")
    assert isinstance(err, PluralServerError) and err.code is None and err.details == {}
    assert err.message == "Plural answered HTTP 500"


def test_non_json_body_is_described_never_quoted():
    # The body itself never reaches classify_http (see test_html_502_... in test_plural_client.py).
    err = classify_http(502, None, body_note="body is not JSON (text/html, 1234 bytes)")
    assert err.message == "Plural answered HTTP 502; body is not JSON (text/html, 1234 bytes)"


def test_a_long_message_is_cut():
    err = classify_http(400, {"code": "INVALID_REQUEST", "message": "m" * 5000})
    assert len(err.message) == 300


@pytest.mark.parametrize("status, cls", [(429, PluralRateLimited), (503, PluralServerError)])
def test_server_hint_is_kept(status, cls):
    err = classify_http(status, None, retry_after="7")
    assert isinstance(err, cls) and err.retry_after == 7.0
    dated = classify_http(status, None, retry_after=email.utils.formatdate(NOW + 30, usegmt=True), now=NOW)
    assert dated.retry_after == pytest.approx(30)
    assert classify_http(status, None, retry_after="garbage").retry_after is None


def test_a_hint_on_a_final_error_changes_nothing():
    err = classify_http(400, {"code": "INVALID_REQUEST", "message": "bad"}, retry_after="7")
    assert err.retry_after is None and not err.retryable


# -- a 4xx is final only when Plural says so -------------------------------------------

@pytest.mark.parametrize("status, body, note", [
    (403, None, "body is not JSON (text/html, 1234 bytes)"),  # a WAF's page
    (404, None, "body is not JSON (text/plain, 9 bytes)"),     # a path nobody serves
    (407, None, "body is empty"),                              # a proxy wanting a login
    (400, None, "body is empty"),
    (422, ["INVALID_REQUEST"], ""),                            # JSON, but not Plural's error shape
    (400, {"error": "bad", "status": 400}, ""),                # a gateway's own JSON
    (404, {"code": 404, "message": None}, ""),                 # neither field a string
])
def test_a_4xx_without_plurals_error_body_is_retryable(status, body, note):
    err = classify_http(status, body, request_id="r", body_note=note)
    assert type(err) is PluralUnexpectedAnswer and err.retryable and err.sent
    assert (err.http_status, err.code, err.request_id) == (status, None, "r")
    assert f"HTTP {status}" in err.message
    assert (note or "not Plural's error shape") in err.message


@pytest.mark.parametrize("body", [
    {"code": "NOT_FOUND"},
    {"message": "no such link"},
    {"code": "INVALID_REQUEST", "message": "bad", "additionalErrorPayload": OMS},
    {"code": "INVALID_REQUEST", "message": "bad", "additional_error_details": OMS},
])
def test_plurals_error_body_in_any_of_its_shapes_keeps_a_4xx_final(body):
    err = classify_http(404, body)
    assert type(err) is PluralRequestError and not err.retryable


def test_401_408_and_429_keep_their_meaning_whatever_the_body():
    assert type(classify_http(401, None, body_note="body is empty")) is PluralAuthError
    assert type(classify_http(408, None)) is PluralTimeout
    assert type(classify_http(429, None)) is PluralRateLimited


# -- the hierarchy ---------------------------------------------------------------------

def test_hierarchy_and_defaults():
    assert issubclass(PluralTimeout, PluralConnectionError)
    for cls in (PluralConnectionError, PluralTimeout, PluralServerError, PluralRateLimited,
                PluralUnexpectedAnswer):
        assert cls("x").retryable
    for cls in (PluralTLSError, PluralAuthError, PluralRequestError, PluralBadResponse, PluralError):
        assert not cls("x").retryable
    assert TokenUnavailable("x").retryable and TokenUnavailable("x").sent is False


def test_str_repr_and_as_dict():
    err = PluralServerError("down", http_status=503, code="INTERNAL_ERROR", request_id="req-9")
    assert str(err) == "down http_status=503 code=INTERNAL_ERROR request_id=req-9"
    assert repr(err) == "PluralServerError('down http_status=503 code=INTERNAL_ERROR request_id=req-9')"
    assert err.as_dict() == {"http_status": 503, "code": "INTERNAL_ERROR", "message": "down"}
    assert PluralTimeout("slow").as_dict() == {"http_status": None, "code": "PluralTimeout", "message": "slow"}


def test_pickle_keeps_every_attribute():
    err = classify_http(500, {"code": "INTERNAL_ERROR", "message": "m", "additionalErrorPayload": OMS},
                        request_id="r", retry_after="3")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is PluralServerError
    assert (back.message, back.http_status, back.code, back.details, back.request_id, back.retry_after,
            back.retryable, back.sent) == ("m", 500, "INTERNAL_ERROR", OMS, "r", 3.0, True, True)
    unsent = pickle.loads(pickle.dumps(PluralConnectionError("refused", request_id="r", sent=False)))
    assert type(unsent) is PluralConnectionError and unsent.sent is False and unsent.retryable


def test_an_error_was_sent_unless_it_says_otherwise():
    assert PluralError("x").sent and classify_http(500, None).sent
    assert PluralTimeout("x", sent=False).sent is False


def test_every_error_the_product_defines_has_the_one_base():
    """Like stripe-python's ``error.py``: one base to catch them all. The sandbox plays Plural
    and keeps its own; ``_private`` ones never leave their module."""
    import ast
    import importlib

    from plural_cancel.errors import PluralCancelError
    from tests.test_imports import product_modules

    checked = []
    for name, path in product_modules().items():
        if name.startswith("plural_cancel.sandbox"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                cls = getattr(importlib.import_module(name), node.name)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    checked.append(cls)
                    assert issubclass(cls, PluralCancelError), f"{name}.{node.name} is not a PluralCancelError"
    assert len(checked) >= 15  # the hierarchy, the CLI's failures, the broker's undecodable body


def test_a_refused_write_is_known_by_its_code_alone_or_in_a_pipeline(redis_client):
    """A master short of replicas refuses writes (NOREPLICAS): a command's error and a
    pipeline's, which redis-py words around Redis's own, are both a refused write."""
    import redis

    from plural_cancel.errors import refusal_code, write_refused

    redis_client.config_set("min-replicas-to-write", 1)
    try:
        errors = []
        for send in (lambda: redis_client.hset("plural-cancel:x", "a", 1),
                     lambda: redis_client.pipeline(transaction=False).hset("plural-cancel:x", "a", 1).execute()):
            try:
                send()
            except redis.ResponseError as exc:
                errors.append(exc)
        assert len(errors) == 2 and "of pipeline caused error" in str(errors[1])
        assert [(write_refused(e), refusal_code(e)) for e in errors] == [(True, "NOREPLICAS")] * 2
    finally:
        redis_client.config_set("min-replicas-to-write", 0)
    assert not write_refused(redis.ResponseError("Command # 1 (GET x) of pipeline caused error: WRONGTYPE ..."))
