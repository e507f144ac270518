"""The Plural sandbox over real HTTP: the seed's shapes, Plural's statuses and every fault.

Most tests use one in-process server on a thread; the last ones start it as a process
through ``tests.support.sandbox``, as the worker's tests do.
"""

from __future__ import annotations

import copy
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import requests

from plural_cancel.sandbox import DEMO_LINKS, DEMO_PERSONAL_DATA, SandboxServer
from plural_cancel.sandbox.links import STATUSES
from tests.support.sandbox import start_sandbox_process

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "tests" / "data" / "cancel-payment-link.openapi.json"
CLIENT_ID, CLIENT_SECRET = "sandbox-test-client", "sandbox-test-secret"
CREDENTIALS = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
               "grant_type": "client_credentials"}
NOT_CANCELLABLE = ["CANCELLED", "PROCESSED", "PARTIAL_PROCESSED", "EXPIRED", "PAYMENT_INITIATED"]
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


# -- fixtures and helpers --------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with SandboxServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, seed=7) as srv:
        yield srv


@pytest.fixture
def sandbox(server):
    """The module's server with its start-up faults back in place after each test."""
    requests.delete(server.admin_url + "/faults", timeout=5).raise_for_status()
    yield server
    requests.delete(server.admin_url + "/faults", timeout=5).raise_for_status()


@pytest.fixture
def token(sandbox):
    response = requests.post(sandbox.url + "/auth/v1/token", json=CREDENTIALS, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def auth(token: str, request_id: str = "req-0001", **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Request-ID": request_id,
            "Request-Timestamp": "2024-07-09T07:57:08.022Z", **extra}


def cancel(sandbox, link_id: str, token: str, **kw) -> requests.Response:
    headers = kw.pop("headers", None) or auth(token)
    return requests.put(f"{sandbox.url}/pay/v1/paymentlink/{link_id}/cancel", headers=headers,
                        timeout=kw.pop("timeout", 5), **kw)


def new_link(sandbox, status: str = "CREATED", prefix: str = "pl-t-") -> str:
    response = requests.post(sandbox.admin_url + "/links",
                             json={"count": 1, "status": status, "prefix": prefix}, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["ids"][0]


def admin_link(sandbox, link_id: str) -> dict:
    return requests.get(f"{sandbox.admin_url}/links/{link_id}", timeout=5).json()


def set_faults(sandbox, **faults) -> dict:
    response = requests.put(sandbox.admin_url + "/faults", json=faults, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def key_paths(value, prefix: str = "") -> set[str]:
    """Every key path in a JSON value (list items share the path ``name[]``)."""
    paths = set()
    if isinstance(value, dict):
        for key, item in value.items():
            paths.add(prefix + key)
            paths |= key_paths(item, prefix + key + ".")
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, prefix.rstrip(".") + "[].")
    return paths


def strict(schema: dict) -> dict:
    """The seed's schema with every property required and no others allowed."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if node.get("type") == "object" and "properties" in node:
            node["required"] = list(node["properties"])
            node["additionalProperties"] = False
            for child in node["properties"].values():
                walk(child)
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def seed_cancel():
    spec = json.loads(OPENAPI.read_text())
    ok = spec["paths"]["/pay/v1/paymentlink/{payment_link_id}/cancel"]["put"]["responses"]["200"]
    content = ok["content"]["application/json"]
    return content["schema"], json.loads(content["examples"]["Result"]["value"])


# -- the seed's call -------------------------------------------------------------------

def test_cancel_answers_the_seeds_200_shape(sandbox, token, seed_cancel):
    schema, example = seed_cancel
    link_id = new_link(sandbox)
    response = cancel(sandbox, link_id, token)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    jsonschema.Draft202012Validator(schema).validate(body)
    jsonschema.Draft202012Validator(strict(schema)).validate(body)
    assert key_paths(body) == key_paths(example)
    assert body["status"] == "CANCELLED" and body["payment_link_id"] == link_id
    assert ISO_MS.match(body["cancelled_at"]) and body["updated_at"] == body["cancelled_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\dZ", body["expire_by"])
    assert body["customer"]["billing_address"]["adddress_type"]
    assert admin_link(sandbox, link_id)["cancel_count"] == 1


def test_clicked_link_can_be_cancelled(sandbox, token):
    link_id = new_link(sandbox, "CLICKED")
    assert cancel(sandbox, link_id, token).json()["status"] == "CANCELLED"


@pytest.mark.parametrize("status", NOT_CANCELLABLE)
def test_cancel_of_a_non_cancellable_link_is_400(sandbox, token, status):
    link_id = new_link(sandbox, status)
    response = cancel(sandbox, link_id, token)
    assert response.status_code == 400
    assert response.json() == {
        "code": "INVALID_REQUEST",
        "message": f"payment link is in status {status} and cannot be cancelled",
        "additional_error_details": {"source": "PAYMENT_LINK", "step": "CANCEL"}}
    view = admin_link(sandbox, link_id)
    assert (view["status"], view["cancel_count"], view["cancel_attempts"]) == (status, 0, 1)


def test_second_cancel_is_400_and_counts_one_success(sandbox, token):
    link_id = new_link(sandbox)
    assert cancel(sandbox, link_id, token).status_code == 200
    assert cancel(sandbox, link_id, token).status_code == 400
    view = admin_link(sandbox, link_id)
    assert (view["cancel_count"], view["cancel_attempts"]) == (1, 2)


def test_unknown_link_is_404(sandbox, token):
    get = requests.get(f"{sandbox.url}/pay/v1/paymentlink/pl-nope", headers=auth(token))
    for response in (cancel(sandbox, "pl-v1-250306082755-aa-nope00", token), get):
        assert response.status_code == 404
        assert response.json()["code"] == "NOT_FOUND"
        assert response.json()["additionalErrorPayload"]["source"] == "PAYMENT_LINK"


@pytest.mark.parametrize("bad_id", ["x" * 51, "bad.id", "bad%20id", ""])
def test_malformed_link_id_is_400(sandbox, token, bad_id):
    response = cancel(sandbox, bad_id, token)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize("headers, problem", [
    ({"Request-ID": None}, "Request-ID header is required"),
    ({"Request-ID": "r" * 51}, "Request-ID must be 1-50 characters"),
    ({"Request-Timestamp": "yesterday"}, "Request-Timestamp must be an ISO 8601 UTC timestamp"),
])
def test_bad_headers_are_400(sandbox, token, headers, problem):
    link_id = new_link(sandbox)
    sent = {k: v for k, v in {**auth(token), **headers}.items() if v is not None}
    response = cancel(sandbox, link_id, token, headers=sent)
    assert response.status_code == 400
    assert response.json() == {"code": "INVALID_REQUEST", "message": problem}
    assert admin_link(sandbox, link_id)["status"] == "CREATED"


def test_wrong_method_is_405(sandbox, token):
    response = requests.post(f"{sandbox.url}/pay/v1/paymentlink/pl-demo-created-01/cancel",
                             headers=auth(token), timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "PUT"


# -- create and get --------------------------------------------------------------------

def test_create_then_get(sandbox, token):
    body = {"amount": {"value": 49900, "currency": "INR"},
            "merchant_payment_link_reference": "order-123_a", "description": "Shoes",
            "expire_by": "2099-03-21T08:29Z",
            "customer": {"email_id": "asha@example.com", "first_name": "Asha"}}
    created = requests.post(f"{sandbox.url}/pay/v1/paymentlink", json=body, headers=auth(token),
                            timeout=5)
    assert created.status_code == 200, created.text
    link = created.json()
    assert re.fullmatch(r"pl-v1-\d{12}-aa-[A-Za-z0-9]{6}", link["payment_link_id"])
    assert (link["status"], link["amount"], link["amount_due"]) == ("CREATED", body["amount"],
                                                                     body["amount"])
    assert (link["expire_by"], link["customer"]) == ("2099-03-21T08:29Z", body["customer"])
    assert ISO_MS.match(link["created_at"]) and "cancelled_at" not in link
    got = requests.get(f"{sandbox.url}/pay/v1/paymentlink/{link['payment_link_id']}",
                       headers=auth(token), timeout=5)
    assert got.status_code == 200 and got.json() == link
    logged = requests.get(sandbox.admin_url + "/requests", timeout=5).json()["requests"]
    assert any(e["method"] == "POST" and e["link_id"] == link["payment_link_id"] for e in logged)


@pytest.mark.parametrize("body, field", [
    ({"merchant_payment_link_reference": "r1"}, "amount"),
    ({"amount": {"value": 1.5, "currency": "INR"}, "merchant_payment_link_reference": "r1"},
     "amount.value"),
    ({"amount": {"value": 100, "currency": "rupees"}, "merchant_payment_link_reference": "r1"},
     "amount.currency"),
    ({"amount": {"value": 100, "currency": "INR"}}, "merchant_payment_link_reference"),
    ({"amount": {"value": 100, "currency": "INR"}, "merchant_payment_link_reference": "a b"},
     "merchant_payment_link_reference"),
    ({"amount": {"value": 100, "currency": "INR"}, "merchant_payment_link_reference": "r1",
      "expire_by": "soon"}, "expire_by"),
    ([1, 2], "request body"),
])
def test_create_rejects_bad_bodies(sandbox, token, body, field):
    response = requests.post(f"{sandbox.url}/pay/v1/paymentlink", json=body, headers=auth(token),
                             timeout=5)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_REQUEST"
    assert response.json()["message"].startswith(field)


def test_demo_links_cover_every_status_with_personal_data(sandbox, token):
    assert set(DEMO_LINKS.values()) == set(STATUSES)
    assert sum(1 for s in DEMO_LINKS.values() if s == "CREATED") >= 3
    seen = ""
    for link_id, status in DEMO_LINKS.items():
        response = requests.get(f"{sandbox.url}/pay/v1/paymentlink/{link_id}", headers=auth(token),
                                timeout=5)
        assert response.status_code == 200
        if response.json()["status"] != "CANCELLED":  # other tests may cancel demo links
            assert response.json()["status"] == status
        seen += response.text
    assert DEMO_PERSONAL_DATA and all(value in seen for value in DEMO_PERSONAL_DATA)
    assert "@example.com" in seen and '"mobile_number":"98' in seen


# -- tokens ----------------------------------------------------------------------------

def test_token_is_opaque_with_iso_expiry(sandbox):
    body = requests.post(sandbox.url + "/auth/v1/token", json=CREDENTIALS, timeout=5).json()
    assert set(body) == {"access_token", "expires_at"}
    assert len(body["access_token"]) >= 32 and ISO_MS.match(body["expires_at"])


@pytest.mark.parametrize("change, status, code", [
    ({"client_secret": "wrong"}, 422, "USER_AUTHENTICATION_FAILED"),
    ({"client_id": "someone-else"}, 422, "USER_AUTHENTICATION_FAILED"),
    ({"grant_type": "password"}, 400, "INVALID_REQUEST"),
    ({"client_secret": None}, 400, "INVALID_REQUEST"),
])
def test_token_refusals(sandbox, change, status, code):
    body = {k: v for k, v in {**CREDENTIALS, **change}.items() if v is not None}
    response = requests.post(sandbox.url + "/auth/v1/token", json=body, timeout=5)
    assert (response.status_code, response.json()["code"]) == (status, code)


def test_any_credentials_and_expires_in_style_when_configured_so():
    with SandboxServer(token_style="expires_in", seed_demo=False) as srv:
        body = requests.post(srv.url + "/auth/v1/token", timeout=5,
                             json={"client_id": "any", "client_secret": "thing",
                                   "grant_type": "client_credentials"}).json()
        assert body["expires_in"] == 3600 and "expires_at" not in body


def test_401_without_a_valid_token(sandbox, token):
    link_id = new_link(sandbox)
    url = f"{sandbox.url}/pay/v1/paymentlink/{link_id}/cancel"
    for headers in ({"Request-ID": "r1"}, {"Request-ID": "r1", "Authorization": "Bearer made-up"},
                    {"Request-ID": "r1", "Authorization": token}):
        response = requests.put(url, headers=headers, timeout=5)
        assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED"
    set_faults(sandbox, reject_tokens=True)
    assert cancel(sandbox, link_id, token).status_code == 401
    set_faults(sandbox, reject_tokens=False)
    assert requests.post(sandbox.admin_url + "/revoke-tokens", timeout=5).json()["revoked"] >= 1
    assert cancel(sandbox, link_id, token).status_code == 401
    assert admin_link(sandbox, link_id)["status"] == "CREATED"


def test_tokens_expire_after_token_ttl(sandbox):
    set_faults(sandbox, token_ttl=0.3)
    short = requests.post(sandbox.url + "/auth/v1/token", json=CREDENTIALS, timeout=5).json()
    link_id = new_link(sandbox)
    time.sleep(0.4)
    assert cancel(sandbox, link_id, short["access_token"]).status_code == 401


def test_links_expire_and_tokens_age_on_the_injected_clock():
    now = [1_700_000_000.0]
    with SandboxServer(clock=lambda: now[0], seed_demo=False) as srv:
        token = requests.post(srv.url + "/auth/v1/token", json=CREDENTIALS, timeout=5).json()
        [link_id] = requests.post(srv.admin_url + "/links", timeout=5, json={
            "id": "pl-clock-01", "expire_by": "2023-11-14T22:20Z"}).json()["ids"]
        assert token["expires_at"] == "2023-11-14T23:13:20.000Z"
        now[0] += 600
        get = requests.get(f"{srv.url}/pay/v1/paymentlink/{link_id}", timeout=5,
                           headers=auth(token["access_token"]))
        assert get.json()["status"] == "EXPIRED"
        assert cancel(srv, link_id, token["access_token"]).status_code == 400
        now[0] += 3600
        assert cancel(srv, link_id, token["access_token"]).status_code == 401


# -- faults ----------------------------------------------------------------------------

def test_latency_delays_answers_but_not_other_connections(sandbox, token):
    set_faults(sandbox, latency_ms=300)
    started = time.monotonic()
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        requests.get(f"{sandbox.url}/pay/v1/paymentlink/pl-demo-clicked-01", headers=auth(token),
                     timeout=5).status_code)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert results == [200] * 10
    assert 0.3 <= elapsed < 1.5  # one after the other would take 3 s


@pytest.mark.parametrize("status", ["500", "503"])
def test_injected_server_errors_are_plural_json(sandbox, token, status):
    link_id = new_link(sandbox)
    set_faults(sandbox, error_rates={status: 1.0})
    response = cancel(sandbox, link_id, token)
    assert response.status_code == int(status)
    body = response.json()
    assert body["code"] == "INTERNAL_ERROR" and body["additionalErrorPayload"]["source"] == "OMS"
    view = admin_link(sandbox, link_id)
    assert (view["status"], view["cancel_attempts"]) == ("CREATED", 1)


def test_injected_502_is_a_proxy_html_page(sandbox, token):
    set_faults(sandbox, error_rates={"502": 1.0})
    response = cancel(sandbox, "pl-demo-created-02", token)
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in response.text


def test_injected_429_carries_retry_after(sandbox, token):
    set_faults(sandbox, error_rates={"429": 1.0}, retry_after=7)
    response = cancel(sandbox, "pl-demo-created-02", token)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert response.json()["code"] == "RATE_LIMITED"


def test_outage_answers_503_everywhere_unless_token_calls_are_spared(sandbox, token):
    set_faults(sandbox, outage=True)
    assert cancel(sandbox, "pl-demo-created-02", token).status_code == 503
    assert requests.post(sandbox.url + "/auth/v1/token", json=CREDENTIALS).status_code == 503
    set_faults(sandbox, faults_skip_token=True)
    assert requests.post(sandbox.url + "/auth/v1/token", json=CREDENTIALS).status_code == 200
    assert cancel(sandbox, "pl-demo-created-02", token).status_code == 503


def test_reset_closes_the_connection_without_an_answer(sandbox, token):
    link_id = new_link(sandbox)
    set_faults(sandbox, reset_rate=1.0)
    with pytest.raises(requests.exceptions.ConnectionError):
        cancel(sandbox, link_id, token)
    entry = requests.get(sandbox.admin_url + "/requests", timeout=5).json()["requests"][-1]
    assert (entry["link_id"], entry["status"], entry["fault"]) == (link_id, None, "reset")
    assert admin_link(sandbox, link_id)["status"] == "CREATED"


def test_timeout_holds_the_answer_after_processing(sandbox, token):
    link_id = new_link(sandbox)
    set_faults(sandbox, timeout_rate=1.0, hang_ms=1500)
    with pytest.raises(requests.exceptions.ReadTimeout):
        cancel(sandbox, link_id, token, timeout=(2, 0.3))
    assert admin_link(sandbox, link_id)["status"] == "CANCELLED"


def test_error_rates_follow_the_seeded_dice(sandbox, token):
    set_faults(sandbox, error_rates={"500": 0.3, "503": 0.2})
    session = requests.Session()
    statuses = [session.get(f"{sandbox.url}/pay/v1/paymentlink/pl-demo-processed-01",
                            headers=auth(token), timeout=5).status_code for _ in range(300)]
    assert 60 <= statuses.count(500) <= 120 and 30 <= statuses.count(503) <= 90
    assert statuses.count(200) == 300 - statuses.count(500) - statuses.count(503)


def test_fault_settings_are_validated_and_reported_whole(sandbox):
    full = set_faults(sandbox, latency_ms=5)
    assert set(full) == {"latency_ms", "error_rates", "retry_after", "outage", "reset_rate",
                         "timeout_rate", "hang_ms", "token_ttl", "reject_tokens",
                         "faults_skip_token", "link_errors", "limit_rps", "throttle_rate",
                         "plural_throttle_rate"}
    assert (full["latency_ms"], full["token_ttl"], full["hang_ms"]) == (5, 3600, 30000)
    for bad in ({"nope": 1}, {"reset_rate": 2}, {"error_rates": {"418": 0.5}},
                {"error_rates": {"500": 0.7, "503": 0.7}}, {"outage": "yes"},
                {"link_errors": {"pl-x": "418"}}, {"link_errors": ["pl-x"]}, {"limit_rps": -1},
                {"throttle_rate": 1.5}, {"plural_throttle_rate": "0.5"}):
        response = requests.put(sandbox.admin_url + "/faults", json=bad, timeout=5)
        assert response.status_code == 400, bad
    assert requests.get(sandbox.admin_url + "/faults", timeout=5).json()["latency_ms"] == 5


# -- admin -----------------------------------------------------------------------------

def test_request_log_records_every_api_call(sandbox, token):
    link_id = new_link(sandbox)
    requests.delete(sandbox.admin_url + "/requests", timeout=5).raise_for_status()
    cancel(sandbox, link_id, token, headers=auth(token, "req-log-1"))
    cancel(sandbox, link_id, token, headers=auth(token, "req-log-2"))
    requests.post(sandbox.url + "/auth/v1/token", json=CREDENTIALS, timeout=5)
    log = requests.get(sandbox.admin_url + "/requests", timeout=5).json()["requests"]
    assert [(e["method"], e["path"], e["link_id"], e["request_id"], e["status"]) for e in log] == [
        ("PUT", f"/api/pay/v1/paymentlink/{link_id}/cancel", link_id, "req-log-1", 200),
        ("PUT", f"/api/pay/v1/paymentlink/{link_id}/cancel", link_id, "req-log-2", 400),
        ("POST", "/api/auth/v1/token", None, None, 200)]
    assert all(abs(e["timestamp"] - time.time()) < 60 for e in log)
    # The caller's Request-Timestamp, the sending as it says (the rate limit is checked on it).
    assert [e["sent_at"] for e in log] == [1720511828.022, 1720511828.022, None]
    later = requests.get(sandbox.admin_url + "/requests", params={"since": log[0]["seq"]},
                         timeout=5).json()["requests"]
    assert [e["seq"] for e in later] == [log[1]["seq"], log[2]["seq"]]
    requests.get(sandbox.admin_url + "/health", timeout=5).raise_for_status()
    assert len(requests.get(sandbox.admin_url + "/requests", timeout=5).json()["requests"]) == 3


def test_admin_links(sandbox):
    response = requests.post(sandbox.admin_url + "/links", timeout=5,
                             json={"count": 500, "status": "CREATED", "prefix": "pl-bulk-"})
    ids = response.json()["ids"]
    assert len(set(ids)) == 500 and all(re.fullmatch(r"pl-bulk-\d{6}", i) for i in ids)
    view = requests.put(f"{sandbox.admin_url}/links/{ids[0]}", json={"status": "PROCESSED"},
                        timeout=5).json()
    assert (view["status"], view["amount_due"]["value"]) == ("PROCESSED", 0)
    one = requests.post(sandbox.admin_url + "/links", json={"id": "pl-mine-1", "status": "CLICKED"})
    assert one.json() == {"ids": ["pl-mine-1"]}
    assert admin_link(sandbox, "pl-mine-1")["status"] == "CLICKED"
    assert requests.post(sandbox.admin_url + "/links", json={"id": "pl-mine-1"}).status_code == 409
    assert requests.get(sandbox.admin_url + "/links/pl-none").status_code == 404
    paid = requests.put(f"{sandbox.admin_url}/links/{ids[1]}", json={"status": "PAID"})
    assert paid.status_code == 400


def test_keep_alive_and_pipelined_requests_answer_in_order(sandbox, token):
    host, port = "127.0.0.1", sandbox.port
    with socket.create_connection((host, port), timeout=5) as sock:
        one = (f"GET /api/pay/v1/paymentlink/pl-demo-expired-01 HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {token}\r\nRequest-ID: p1\r\n\r\n").encode()
        sock.sendall(one + b"GET /_admin/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2 or not data.endswith(b'{"status":"ok"}'):
            data += sock.recv(65536)
        assert data.index(b"pl-demo-expired-01") < data.index(b'{"status":"ok"}')
    conn = http.client.HTTPConnection(host, port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/_admin/health")
        assert conn.getresponse().read() == b'{"status":"ok"}'
    conn.close()


# -- as a process ----------------------------------------------------------------------

def test_process_with_helper_serves_faults_and_stops_cleanly():
    proc = start_sandbox_process(client_id="proc-id", client_secret="proc-secret",
                                 extra_args=["--token-ttl", "120"])
    try:
        bad = requests.post(proc.url + "/auth/v1/token", timeout=5, json={
            "client_id": "proc-id", "client_secret": "nope", "grant_type": "client_credentials"})
        assert bad.status_code == 422
        token = requests.post(proc.url + "/auth/v1/token", timeout=5, json={
            "client_id": "proc-id", "client_secret": "proc-secret",
            "grant_type": "client_credentials"}).json()["access_token"]
        assert proc.faults()["token_ttl"] == 120
        [link_id, other] = proc.create_links(2, prefix="pl-proc-")
        proc.clear_requests()
        assert cancel(proc, link_id, token).status_code == 200
        assert proc.link(link_id)["cancel_count"] == 1
        assert [(e["method"], e["link_id"], e["status"]) for e in proc.requests()] == [
            ("PUT", link_id, 200)]
        proc.set_link_status(other, "PAYMENT_INITIATED")
        assert cancel(proc, other, token).status_code == 400
        proc.set_faults(error_rates={"503": 1.0})
        assert cancel(proc, "pl-demo-created-01", token).status_code == 503
        proc.reset_faults()
        assert proc.revoke_tokens() == 1
        assert cancel(proc, "pl-demo-created-01", token).status_code == 401
        assert proc.issued_tokens() == [token]
    finally:
        assert proc.stop() == 0


def test_process_kill_and_bad_options():
    proc = start_sandbox_process()
    assert proc.kill() == -9
    cli = subprocess.run([sys.executable, "-m", "sandbox", "--error-rate", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 2 and "'--error-rate'" in cli.stderr
