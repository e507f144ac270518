"""The sandbox as a throttling Plural with several merchant accounts, over real HTTP.

Plural's own limit on cancels (``limit_rps``, counted per account), random 429s
(``throttle_rate``), throttles in Plural's words (``plural_throttle_rate``: 400
``PAYMENT_RATE_LIMIT``), and accounts whose tokens and faults are their own. Exact counts
come from a server on an injected clock; the runs paced on the wall clock check the window
against the sandbox's own log and bound shares widely, never speeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from plural_cancel.sandbox import SandboxServer
from tests.support.sandbox import is_throttle, start_sandbox_process, throttles_per_second

ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = {"shop-a": "secret-a", "shop-b": "secret-b"}


class Clock:
    """The sandbox's clock, moved by hand: epoch seconds."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Client:
    """Plural calls and admin calls to one in-process sandbox, on one keep-alive session."""

    def __init__(self, server: SandboxServer):
        self.server = server
        self.http = requests.Session()

    def token_call(self, client_id: str, client_secret: str) -> requests.Response:
        return self.http.post(self.server.url + "/auth/v1/token", timeout=10, json={
            "client_id": client_id, "client_secret": client_secret, "grant_type": "client_credentials"})

    def token(self, account: str) -> str:
        response = self.token_call(account, ACCOUNTS.get(account, "any-secret"))
        assert response.status_code == 200, response.text
        return response.json()["access_token"]

    def cancel(self, link_id: str, token: str, request_id: str = "req-1") -> requests.Response:
        return self.http.put(f"{self.server.url}/pay/v1/paymentlink/{link_id}/cancel", timeout=10,
                             headers={"Authorization": f"Bearer {token}", "Request-ID": request_id})

    def get(self, link_id: str, token: str) -> requests.Response:
        return self.http.get(f"{self.server.url}/pay/v1/paymentlink/{link_id}", timeout=10,
                             headers={"Authorization": f"Bearer {token}", "Request-ID": "get-1"})

    def links(self, count: int, prefix: str = "pl-thr-") -> list[str]:
        return self.admin("POST", "/links", json={"count": count, "prefix": prefix})["ids"]

    def link(self, link_id: str) -> dict:
        return self.admin("GET", f"/links/{link_id}")

    def faults(self, account: str | None = None, **changes) -> dict:
        """Partial update of the global faults, or of ``account``'s own; returns those in force."""
        path = "/faults" if account is None else f"/accounts/{account}/faults"
        return self.admin("PUT", path, json=changes)

    def admin(self, method: str, path: str, expect: int = 200, **kw) -> dict:
        response = self.http.request(method, self.server.admin_url + path, timeout=10, **kw)
        assert response.status_code == expect, response.text
        return response.json()

    def log(self, since: int = 0) -> list[dict]:
        return self.admin("GET", "/requests", params={"since": since})["requests"]

    def last_seq(self) -> int:
        log = self.log()
        return log[-1]["seq"] if log else 0


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def frozen_server(clock):
    with SandboxServer(accounts=ACCOUNTS, clock=clock, seed_demo=False) as srv:
        yield srv


def client_with_startup_faults(server: SandboxServer):
    """A :class:`Client` of ``server``, its start-up faults (none) in place before and after."""
    client = Client(server)
    client.admin("DELETE", "/faults")
    yield client
    client.admin("DELETE", "/faults")
    client.http.close()


@pytest.fixture
def frozen(frozen_server):
    """A sandbox whose time moves only when the test moves it: exact counts, exact waits."""
    yield from client_with_startup_faults(frozen_server)


@pytest.fixture(scope="module")
def live_server():
    with SandboxServer(accounts=ACCOUNTS, seed=11, seed_demo=False) as srv:
        yield srv


@pytest.fixture
def live(live_server):
    """A sandbox on the wall clock."""
    yield from client_with_startup_faults(live_server)


def cancels_of(log: list[dict], account: str) -> list[dict]:
    return [e for e in log if e["method"] == "PUT" and e["account"] == account]


def paced(client: Client, token: str, links: list[str], rate: float) -> None:
    """Cancel ``links`` one after the other, each sent at least 1/``rate`` s after the last:
    a client that falls behind does not catch up with a burst."""
    gap = 1.0 / rate
    next_at = time.monotonic()
    for link_id in links:
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        next_at = time.monotonic() + gap
        client.cancel(link_id, token)


# -- Plural's own limit ----------------------------------------------------------------

def test_past_the_limit_a_cancel_is_429_with_retry_after_and_the_link_untouched(frozen, clock):
    frozen.faults(limit_rps=10)
    token = frozen.token("shop-a")
    links = frozen.links(25)
    answers = [frozen.cancel(link_id, token) for link_id in links]
    assert [a.status_code for a in answers] == [200] * 10 + [429] * 15
    for link_id, answer in zip(links[10:], answers[10:]):
        assert answer.headers["Retry-After"] == "1"
        assert answer.json()["code"] == "RATE_LIMITED"
        view = frozen.link(link_id)
        assert (view["status"], view["cancel_count"], view["cancel_attempts"]) == ("CREATED", 0, 1)
    assert all(frozen.link(link_id)["status"] == "CANCELLED" for link_id in links[:10])
    log = frozen.log()[-25:]
    assert [e["fault"] for e in log] == [None] * 10 + ["limit"] * 15
    assert [e["status"] for e in log] == [200] * 10 + [429] * 15

    clock.now += 0.6  # 0.4 s before the oldest admitted cancel leaves the window: still 1 s, rounded up
    assert frozen.cancel(links[10], token).headers["Retry-After"] == "1"
    clock.now += 0.4  # a second after the burst: ten free slots again
    assert [frozen.cancel(link_id, token).status_code for link_id in links[10:21]] == [200] * 10 + [429]


def test_retry_after_is_the_whole_seconds_to_the_next_free_slot_rounded_up(frozen, clock):
    frozen.faults(limit_rps=0.25)  # one cancel every 4 s
    token = frozen.token("shop-a")
    first, second = frozen.links(2)
    assert frozen.cancel(first, token).status_code == 200
    clock.now += 0.5
    refused = frozen.cancel(second, token)
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "4")  # 3.5 s away
    clock.now += 3.2
    assert frozen.cancel(second, token).headers["Retry-After"] == "1"  # 0.3 s away
    clock.now += 0.3
    assert frozen.cancel(second, token).status_code == 200


def test_the_limit_spares_gets_and_token_calls_and_no_limit_is_none(frozen):
    links = frozen.links(3)
    token = frozen.token("shop-a")
    assert {frozen.cancel(link_id, token).status_code for link_id in links} == {200}  # 0: no limit
    frozen.faults(limit_rps=1)
    for _ in range(5):
        assert frozen.get(links[0], token).status_code == 200
        frozen.token("shop-a")
    fresh = frozen.links(2)
    assert [frozen.cancel(link_id, token).status_code for link_id in fresh] == [200, 429]


def test_at_one_and_a_half_times_the_limit_about_a_third_is_throttled(frozen, clock):
    frozen.faults(limit_rps=20)
    token = frozen.token("shop-a")
    statuses = []
    for link_id in frozen.links(90):  # 30 a second for 3 s, steady
        statuses.append(frozen.cancel(link_id, token).status_code)
        clock.now += 1 / 30
    assert 28 <= statuses.count(429) <= 32
    assert statuses.count(200) + statuses.count(429) == 90


def test_a_reset_forgets_what_the_limit_counted(frozen):
    token = frozen.token("shop-a")
    links = frozen.links(3)
    frozen.faults(limit_rps=1)
    assert [frozen.cancel(link_id, token).status_code for link_id in links[:2]] == [200, 429]
    frozen.admin("DELETE", "/faults")
    assert frozen.admin("GET", "/faults")["limit_rps"] == 0
    frozen.faults(limit_rps=1)  # the same instant: only a forgotten count admits it
    assert frozen.cancel(links[2], token).status_code == 200


def test_the_limit_counts_each_account_on_its_own(frozen, clock):
    frozen.faults(limit_rps=3)
    tokens = {account: frozen.token(account) for account in ACCOUNTS}
    for account, token in tokens.items():
        assert [frozen.cancel(link_id, token).status_code for link_id in frozen.links(5)] == [200] * 3 + [429] * 2
    clock.now += 1
    assert frozen.faults("shop-b", limit_rps=1)["limit_rps"] == 1
    assert frozen.admin("GET", "/faults")["limit_rps"] == 3
    statuses = {account: [frozen.cancel(link_id, token).status_code for link_id in frozen.links(4)]
                for account, token in tokens.items()}
    assert statuses == {"shop-a": [200] * 3 + [429], "shop-b": [200] + [429] * 3}


def test_paced_under_the_limit_no_429_and_over_it_the_window_holds(live):
    """On the wall clock: at 0.6 x the limit nothing is throttled; at 1.5 x, no second of
    the sandbox's own log holds more than the limit, no cancel was refused while its second
    had room, and roughly a third is refused."""
    limit = 20
    live.faults(limit_rps=limit)
    since = live.last_seq()
    paced(live, live.token("shop-a"), live.links(24), rate=0.6 * limit)
    paced(live, live.token("shop-b"), live.links(90), rate=1.5 * limit)
    log = live.log(since)
    assert [e["status"] for e in cancels_of(log, "shop-a")] == [200] * 24

    over = cancels_of(log, "shop-b")
    admitted = [e["timestamp"] for e in over if e["status"] == 200]
    assert len(admitted) + sum(e["status"] == 429 for e in over) == 90
    for entry in over:
        t = entry["timestamp"]
        # The limiter's own arithmetic (sandbox/limit.py): a cancel at s is in t's window while s + 1 - t > 0.
        in_window = sum(1 for s in admitted if s <= t and s + 1.0 - t > 0)
        if entry["status"] == 200:
            assert in_window <= limit, entry
        else:
            assert in_window == limit and entry["fault"] == "limit", entry
    for second, (sent, throttled) in throttles_per_second(log, account="shop-b").items():
        assert sent - throttled <= limit, second
    share = sum(map(is_throttle, over)) / len(over)
    # 1/3 at a steady 1.5 x; a loaded machine sends slower (fewer refused), never faster.
    assert 0.1 <= share <= 0.45, share


# -- random throttles ------------------------------------------------------------------

def test_throttle_rate_answers_cancels_429_at_random_with_retry_after(live):
    token = live.token("shop-a")
    links = live.links(200)
    live.faults(throttle_rate=0.3, retry_after=4)
    answers = [live.cancel(link_id, token) for link_id in links]
    throttled = [(link_id, a) for link_id, a in zip(links, answers) if a.status_code == 429]
    assert 30 <= len(throttled) <= 90  # binomial(200, 0.3): 60, sd 6.5
    assert {a.status_code for a in answers} == {200, 429}
    for link_id, answer in throttled[:10]:
        assert answer.headers["Retry-After"] == "4" and answer.json()["code"] == "RATE_LIMITED"
        assert live.link(link_id)["status"] == "CREATED"
    assert [e["fault"] for e in live.log()[-200:]].count("throttle") == len(throttled)
    live.faults(throttle_rate=1.0)
    assert live.get(links[0], token).status_code == 200  # cancels only
    assert live.token_call("shop-a", "secret-a").status_code == 200


def test_plural_throttle_is_a_400_payment_rate_limit_in_plurals_shape(live):
    token = live.token("shop-a")
    link_id = live.links(1)[0]
    live.faults(plural_throttle_rate=1.0)
    answer = live.cancel(link_id, token)
    assert answer.status_code == 400 and "Retry-After" not in answer.headers
    body = answer.json()
    assert set(body) == {"code", "message"} and body["code"] == "PAYMENT_RATE_LIMIT" and body["message"]
    view = live.link(link_id)
    assert (view["status"], view["cancel_count"], view["cancel_attempts"]) == ("CREATED", 0, 1)
    entry = live.log()[-1]
    assert (entry["status"], entry["fault"], entry["account"]) == (400, "plural_throttle", "shop-a")
    assert live.get(link_id, token).status_code == 200
    live.faults(plural_throttle_rate=0.25)
    statuses = [live.cancel(i, token).status_code for i in live.links(200)]
    assert 20 <= statuses.count(400) <= 80 and statuses.count(200) == 200 - statuses.count(400)


# -- accounts --------------------------------------------------------------------------

def test_each_token_belongs_to_the_account_that_obtained_it(live):
    since = live.last_seq()
    tokens = {account: live.token(account) for account in ACCOUNTS}
    a_link, b_link = live.links(2)
    assert live.cancel(a_link, tokens["shop-a"], "by-a").status_code == 200
    assert live.cancel(b_link, tokens["shop-b"], "by-b").status_code == 200
    wrong = live.token_call("shop-a", ACCOUNTS["shop-b"])
    unknown = live.token_call("shop-z", "secret-z")
    for refused in (wrong, unknown):
        assert refused.status_code == 422
        assert refused.json() == {"code": "USER_AUTHENTICATION_FAILED",
                                  "message": "client_id or client_secret is not valid"}
    log = live.log(since)
    assert [(e["method"], e["request_id"], e["account"], e["status"]) for e in log] == [
        ("POST", None, "shop-a", 200), ("POST", None, "shop-b", 200),
        ("PUT", "by-a", "shop-a", 200), ("PUT", "by-b", "shop-b", 200),
        ("POST", None, "shop-a", 422), ("POST", None, None, 422)]
    text = json.dumps(log)
    assert not any(secret in text for secret in ACCOUNTS.values())
    assert not any(token in text for token in tokens.values())
    assert live.admin("GET", "/accounts") == {"accounts": ["shop-a", "shop-b"], "faults": {}}


def test_an_accounts_own_outage_hits_only_that_account(live):
    tokens = {account: live.token(account) for account in ACCOUNTS}
    in_force = live.faults("shop-b", outage=True)
    assert in_force["outage"] is True and live.admin("GET", "/faults")["outage"] is False
    assert live.admin("GET", "/accounts")["faults"] == {"shop-b": {"outage": True}}
    a_link, b_link = live.links(2)
    assert live.cancel(b_link, tokens["shop-b"]).status_code == 503
    assert live.token_call("shop-b", ACCOUNTS["shop-b"]).status_code == 503
    assert live.cancel(a_link, tokens["shop-a"]).status_code == 200
    assert live.token_call("shop-a", ACCOUNTS["shop-a"]).status_code == 200
    assert live.link(b_link)["status"] == "CREATED"
    assert live.faults("shop-b", outage=None)["outage"] is False  # null: the global value again
    assert live.admin("GET", "/accounts")["faults"] == {}
    assert live.cancel(b_link, tokens["shop-b"]).status_code == 200


def test_global_faults_reach_every_account_but_in_the_fields_it_sets_itself(live):
    tokens = {account: live.token(account) for account in ACCOUNTS}
    live.faults("shop-b", error_rates={})
    live.faults(error_rates={"500": 1.0}, retry_after=9)
    assert live.admin("GET", "/accounts/shop-b/faults")["retry_after"] == 9  # not its own: follows
    a_link, b_link, c_link = live.links(3)
    assert live.cancel(a_link, tokens["shop-a"]).status_code == 500
    assert live.cancel(b_link, tokens["shop-b"]).status_code == 200
    assert live.admin("DELETE", "/accounts/shop-b/faults")["error_rates"] == {"500": 1.0}
    assert live.cancel(c_link, tokens["shop-b"]).status_code == 500
    live.faults("shop-a", reject_tokens=True)
    live.admin("DELETE", "/faults")  # every account back to the start-up faults
    assert live.admin("GET", "/accounts")["faults"] == {}
    assert live.cancel(c_link, tokens["shop-a"]).status_code == 200


def test_an_accounts_own_reject_tokens_refuses_only_its_tokens(live):
    tokens = {account: live.token(account) for account in ACCOUNTS}
    live.faults("shop-a", reject_tokens=True)
    a_link, b_link = live.links(2)
    refused = live.cancel(a_link, tokens["shop-a"])
    assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHORIZED"
    assert live.cancel(b_link, tokens["shop-b"]).status_code == 200


@pytest.mark.parametrize("path, body, words", [
    ("/accounts/shop-z/faults", {"outage": True}, "'shop-z'"),
    ("/accounts/shop-a/faults", {"limit_rps": -1}, "limit_rps"),
    ("/faults", {"limit_rps": 1e300}, "limit_rps"),
    ("/accounts/shop-a/faults", {"throttle_rate": 2}, "throttle_rate"),
    ("/accounts/shop-a/faults", {"nope": None}, "'nope'"),
    ("/faults", {"plural_throttle_rate": True}, "plural_throttle_rate"),
])
def test_bad_fault_settings_are_400_naming_the_field(live, path, body, words):
    answer = live.admin("PUT", path, expect=400, json=body)
    assert answer["code"] == "INVALID_REQUEST" and words in answer["message"]
    assert live.admin("GET", "/accounts")["faults"] == {}


def test_with_no_account_set_any_pair_is_one_and_can_have_its_own_faults():
    with SandboxServer(seed_demo=False) as srv:
        client = Client(srv)
        tokens = {who: client.token(who) for who in ("anyone", "someone")}
        client.faults("anyone", outage=True)
        a_link, b_link = client.links(2)
        assert client.cancel(a_link, tokens["anyone"]).status_code == 503
        assert client.cancel(b_link, tokens["someone"]).status_code == 200
        assert [e["account"] for e in client.log()[-2:]] == ["anyone", "someone"]
        assert client.admin("GET", "/accounts") == {"accounts": [], "faults": {"anyone": {"outage": True}}}


# -- as a process, from its command line -----------------------------------------------

def test_process_takes_accounts_and_throttles_from_its_command_line_and_at_run_time():
    proc = start_sandbox_process(client_id="main-id", client_secret="main-secret",
                                 accounts=list(ACCOUNTS.items()),
                                 extra_args=["--limit-rps", "2", "--retry-after", "5", "--no-demo-links"])
    try:
        assert proc.accounts()["accounts"] == ["main-id", "shop-a", "shop-b"]
        started = proc.faults()
        assert (started["limit_rps"], started["retry_after"], started["throttle_rate"],
                started["plural_throttle_rate"]) == (2, 5, 0, 0)
        token = proc.token("shop-a", "secret-a")
        assert proc.token("main-id", "main-secret")
        links = proc.create_links(8, prefix="pl-proc-thr-")
        url = proc.url + "/pay/v1/paymentlink/{}/cancel"

        def cancel(link_id: str, bearer: str = token) -> requests.Response:
            return requests.put(url.format(link_id), timeout=10,
                                headers={"Authorization": f"Bearer {bearer}", "Request-ID": "proc-1"})

        burst = [cancel(link_id).status_code for link_id in links[:6]]
        assert burst[:2] == [200, 200] and 429 in burst  # six in under 3 s: 2 a second at most
        assert proc.set_faults(limit_rps=0, throttle_rate=1.0)["throttle_rate"] == 1.0
        refused = cancel(links[6])
        assert (refused.status_code, refused.headers["Retry-After"]) == (429, "5")
        proc.set_faults(throttle_rate=0, plural_throttle_rate=1.0)
        assert cancel(links[6]).json()["code"] == "PAYMENT_RATE_LIMIT"
        assert proc.set_faults(account="shop-b", outage=True)["outage"] is True
        assert proc.faults(account="shop-b")["plural_throttle_rate"] == 1.0
        assert proc.reset_faults(account="shop-b")["outage"] is False
        assert proc.reset_faults() == started
        assert cancel(links[7]).status_code == 200
        log = proc.requests()
        assert {e["account"] for e in log if e["method"] == "PUT"} == {"shop-a"}
        assert [e["fault"] for e in log if e["method"] == "PUT"][-3:] == ["throttle", "plural_throttle", None]
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("args, words", [
    (["--account", "no-colon"], "'--account'"),
    (["--account", ":a-secret-value"], "'--account'"),
    (["--account", "shop-a:one", "--account", "shop-a:two"], "'shop-a'"),
    (["--limit-rps", "-1"], "'--limit-rps'"),
    (["--throttle-rate", "1.5"], "'--throttle-rate'"),
    (["--plural-throttle-rate", "2"], "'--plural-throttle-rate'"),
])
def test_bad_throttle_and_account_options_are_exit_2_naming_them(args, words):
    result = subprocess.run([sys.executable, "-m", "sandbox", "--port", "0", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PLURAL_")})
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "a-secret-value" not in result.stderr and "Traceback" not in result.stderr
