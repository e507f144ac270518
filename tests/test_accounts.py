"""Many Plural accounts in one fleet: real workers, a real Redis, the sandbox holding several
accounts, each token bound to its account and each account with its own faults.

Each account has its own token, rate limit and breaker, and its own turn at the backlog:
what one account's outage, bad secret, throttling or ten thousand waiting cancels do must
never slow, hold or fail another's cancels.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import use_settings, wait_for
from tests.support.sandbox import start_sandbox_process
from tests.support.workers import CELERY, ROOT, service_env, start_worker

# Client ids and secrets of the sandbox's accounts (the default one is the tests' usual).
CREDENTIALS = {"ida": "secret-a", "idb": "secret-b", "idc": "secret-c", "idd": "secret-d", "ide": "secret-e"}
RATES = {"shop-a": 5, "shop-b": 10, "shop-c": 10, "shop-d": 10}
"""Each account's ``rate_limit`` in the file, calls per second."""
CLIENT_IDS = {"shop-a": "ida", "shop-b": "idb", "shop-c": "idc", "shop-d": "idd", "shop-e": "ide"}


def accounts_toml(names, *, wrong_secret=(), secret_env=()) -> str:
    """An accounts file for ``names``; ``wrong_secret``: those given a secret Plural refuses;
    ``secret_env``: those whose secret is read from ``<NAME>_SECRET`` instead of the file."""
    out = []
    for name in names:
        client_id = CLIENT_IDS[name]
        out.append(f"[accounts.{name}]\nclient_id = \"{client_id}\"\n")
        if name in secret_env:
            out.append(f"client_secret_env = \"{env_name(name)}\"\n")
        else:
            secret = "not-the-secret" if name in wrong_secret else CREDENTIALS[client_id]
            out.append(f"client_secret = \"{secret}\"\n")
        if name in RATES:
            out.append(f"rate_limit = {RATES[name]}\n")
    return "".join(out)


def env_name(name: str) -> str:
    return name.upper().replace("-", "_") + "_SECRET"


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def sandbox():
    proc = start_sandbox_process(client_id="test-client", client_secret="test-secret-do-not-leak",
                                 accounts=CREDENTIALS.items())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fleet(module_redis_url, sandbox, sentry, tmp_path_factory):
    """Two workers serving the default account and shop-a to shop-d (shop-c with a secret
    Plural refuses), reporting to a Sentry, and a producer's app that has no accounts file."""
    path = write_private(tmp_path_factory.mktemp("accounts") / "accounts.toml",
                         accounts_toml(["shop-a", "shop-b", "shop-c", "shop-d"], wrong_secret=["shop-c"]))
    env = service_env(module_redis_url, sandbox.url, PLURAL_ACCOUNTS_FILE=str(path), CANCEL_RETRY_BASE="0.5",
                      CANCEL_RETRY_CAP="2", SENTRY_DSN=sentry.dsn)
    workers = [start_worker(env, concurrency=16) for _ in range(2)]
    app = use_settings(module_redis_url, sandbox.url)
    wait_for(lambda: set(app.runtime.published_accounts()) >= set(RATES), 10, message="accounts published")
    yield {"app": app, "sandbox": sandbox, "workers": workers, "sentry": sentry}
    for worker in workers:
        worker.stop()


@pytest.fixture(autouse=True)
def _fresh(request, sandbox):
    yield
    sandbox.reset_faults()


def statuses(app, ids):
    return app.runtime.ledger.statuses(ids)


def ended(app, ids, timeout):
    return wait_for(lambda: (s := statuses(app, ids)) and all(x and x["state"] in ("succeeded", "failed")
                                                            for x in s) and s,
                    timeout, interval=0.2, message=f"{len(ids)} cancels ended")


def puts_of(sandbox, links) -> list[dict]:
    links = set(links)
    return [r for r in sandbox.requests() if r["method"] == "PUT" and r["link_id"] in links]


def busiest_second(entries) -> int:
    """The most calls that arrived within any 1-s window (sliding, from each arrival)."""
    times = sorted(r["timestamp"] for r in entries)
    return max((sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times)), default=0)


def test_every_put_carries_its_accounts_token_and_each_account_keeps_to_its_own_limit(fleet):
    app, sandbox = fleet["app"], fleet["sandbox"]
    from plural_cancel import enqueue_many

    links = {name: sandbox.create_links(20, prefix=f"pl-tok-{name}-") for name in ("shop-a", "shop-b")}
    ids = {name: enqueue_many(links[name], account=name, app=app) for name in links}
    done = ended(app, ids["shop-a"] + ids["shop-b"], 30)
    assert {(s["state"], s["account"]) for s in done[:20]} == {("succeeded", "shop-a")}
    assert {(s["state"], s["account"]) for s in done[20:]} == {("succeeded", "shop-b")}
    for name in links:
        puts = puts_of(sandbox, links[name])
        # Each PUT's token is its cancel's account's: the sandbox binds a token to the account
        # that obtained it and logs that account.
        assert {r["account"] for r in puts} == {CLIENT_IDS[name]}
        assert busiest_second(puts) <= RATES[name] + 1, (name, busiest_second(puts))
    # shop-a (5/s) took about four seconds for its twenty; shop-b (10/s) half that: each its own pace.
    spans = {name: (lambda t: max(t) - min(t))([r["timestamp"] for r in puts_of(sandbox, links[name])])
             for name in links}
    assert spans["shop-a"] >= 2.8 and spans["shop-b"] < spans["shop-a"], spans
    # Each token is cached under its own account's key.
    keys = app.runtime.keys
    assert app.runtime.redis.exists(keys.account_key("shop-a", "token"), keys.account_key("shop-b", "token")) == 2


def test_one_accounts_outage_bad_secret_or_throttling_never_holds_another_back(fleet):
    """shop-a's Plural is down (its breaker opens), shop-c's secret is refused, shop-d is
    throttled hard (Plural's limit 1/s, against its 10): shop-b's cancels go through at shop-b's
    own pace all the while."""
    app, sandbox = fleet["app"], fleet["sandbox"]
    from plural_cancel import enqueue_many

    sandbox.set_faults(account="ida", error_rates={"503": 1.0})
    sandbox.set_faults(account="idd", limit_rps=1)
    troubled = {name: enqueue_many(sandbox.create_links(15, prefix=f"pl-iso-{name}-"), account=name, app=app)
                for name in ("shop-a", "shop-c", "shop-d")}
    wait_for(lambda: app.runtime.breaker_of("shop-a").state()["state"] == "open", 20, message="shop-a's breaker open")
    b_links = sandbox.create_links(40, prefix="pl-iso-shop-b-")
    began = time.time()
    b_ids = enqueue_many(b_links, account="shop-b", app=app)
    done = ended(app, b_ids, 20)
    assert {s["state"] for s in done} == {"succeeded"}
    took = max(r["timestamp"] for r in puts_of(sandbox, b_links)) - began
    # 40 at 10/s (less the 3 % the limiter keeps back) is about 4.1 s: well under 6, whatever the others do.
    assert took < 6.0, took
    assert app.runtime.breaker_of("shop-b").state()["state"] == "closed"
    c = ended(app, troubled["shop-c"], 20)
    assert {(s["state"], s["outcome"]) for s in c} == {("failed", "auth_failed")}
    # Each failure is reported tagged with its account, and so is shop-a's breaker opening.
    sentry = fleet["sentry"]
    reported = sentry.wait_for_events(lambda e: e.get("tags", {}).get("request_id") in troubled["shop-c"], count=15)
    assert {e["tags"]["account"] for e in reported} == {"shop-c"}
    [opened] = sentry.wait_for_events(lambda e: "breaker-opened" in e.get("fingerprint", []))
    assert opened["tags"]["account"] == "shop-a"
    assert app.runtime.breaker_of("shop-a").state()["state"] in ("open", "half_open")
    d_puts = puts_of(sandbox, [s["payment_link_id"] for s in statuses(app, troubled["shop-d"])])
    assert any(r["status"] == 429 for r in d_puts)  # throttled, and only shop-d's
    assert not any(r["status"] == 429 for r in puts_of(sandbox, b_links))


def test_an_unknown_account_is_refused_before_anything_is_written(fleet):
    app = fleet["app"]
    from plural_cancel import enqueue_cancel, enqueue_many, schedule_cancel

    before = set(app.runtime.redis.keys("plural-cancel:req:*"))
    for call in (lambda: enqueue_cancel("pl-unknown-1", account="shop-z", app=app),
                 lambda: enqueue_many(["pl-unknown-2"], account="shop-z", app=app),
                 lambda: schedule_cancel("pl-unknown-3", at=__import__("datetime").datetime.now(
                     __import__("datetime").timezone.utc), account="shop-z", app=app)):
        with pytest.raises(ValueError, match=r"^account: 'shop-z' is not an account the workers know \(known: "):
            call()
    with pytest.raises(ValueError, match="^account: must be 1-50 characters"):
        enqueue_cancel("pl-unknown-4", account="shop z", app=app)
    assert set(app.runtime.redis.keys("plural-cancel:req:*")) == before
    assert not app.runtime.redis.exists("plural-cancel:link:shop-z:pl-unknown-1")


def test_a_cancel_sent_by_name_for_an_unknown_account_ends_rejected_naming_it(fleet):
    app = fleet["app"]
    app.send_task("tasks.cancel_payment_link", queue=app.conf.task_default_queue,
                  kwargs={"payment_link_id": "pl-by-name", "request_id": "by-name-unknown", "account": "shop-z"})
    status = wait_for(lambda: (s := app.runtime.ledger.status("by-name-unknown")) and s["state"] == "failed" and s,
                      15, message="rejected")
    assert (status["outcome"], status["account"], status["last_error"]["code"]) == (
        "rejected", "shop-z", "UNKNOWN_ACCOUNT")
    assert "'shop-z'" in status["last_error"]["message"]
    assert not app.runtime.redis.exists(app.runtime.keys.account_key("shop-z", "stats"))  # a name leaves no key
    # The same Request-ID again, for another link: one Request-ID, one cancel; counted as a conflict.
    before = app.runtime.redis.hget(app.runtime.keys.malformed, "request_id_conflict") or b"0"
    app.send_task("tasks.cancel_payment_link", queue=app.conf.task_default_queue,
                  kwargs={"payment_link_id": "pl-by-name-2", "request_id": "by-name-unknown", "account": "shop-z"})
    wait_for(lambda: int(app.runtime.redis.hget(app.runtime.keys.malformed, "request_id_conflict") or 0)
             == int(before) + 1, 15, message="counted as a conflict")


def test_an_account_another_worker_has_published_is_waited_for_not_refused(fleet):
    """A worker whose accounts file is behind another's (a file being rolled out) puts the
    cancel off until its next look at the file, instead of failing it."""
    import threading

    app = fleet["app"]
    # A worker with the newer file keeps publishing the name, as the fleet's own workers keep
    # publishing theirs (without it): the test plays that worker until the cancel is put off.
    done = threading.Event()

    def newer_worker():
        while not done.is_set():
            app.runtime.redis.hset(app.runtime.keys.accounts, "shop-new", 10)
            done.wait(0.05)

    publisher = threading.Thread(target=newer_worker, daemon=True)
    publisher.start()
    try:
        app.send_task("tasks.cancel_payment_link", queue=app.conf.task_default_queue,
                      kwargs={"payment_link_id": "pl-new-1", "request_id": "by-name-new", "account": "shop-new"})
        status = wait_for(lambda: (s := app.runtime.ledger.status("by-name-new")) and s["next_attempt_at"] and s,
                          15, message="put off")
    finally:
        done.set()
        publisher.join()
    assert (status["state"], status["attempts"], status["last_error"]) == ("queued", 0, None)


def test_a_request_id_names_one_cancel_across_accounts(fleet):
    app = fleet["app"]
    from plural_cancel import enqueue_cancel
    from plural_cancel.errors import RequestIdConflict

    link = fleet["sandbox"].create_links(1, prefix="pl-rid-")[0]
    assert enqueue_cancel(link, request_id="one-rid", account="shop-b", app=app) == "one-rid"
    assert enqueue_cancel(link, request_id="one-rid", account="shop-b", app=app) == "one-rid"  # the same cancel
    with pytest.raises(RequestIdConflict, match="^request_id: 'one-rid' is already used"):
        enqueue_cancel(link, request_id="one-rid", account="shop-d", app=app)
    # One live cancel per (account, link): the same link under two accounts is two cancels.
    assert app.runtime.ledger.status("one-rid")["account"] == "shop-b"


def test_a_backlog_of_ten_thousand_never_delays_another_accounts_cancel(fleet):
    """shop-a (5/s) has 10,000 cancels waiting: a cancel of shop-b reaches Plural within 2 s,
    three times over. Last in the module: shop-a's backlog is left to the flush."""
    app, sandbox = fleet["app"], fleet["sandbox"]
    from plural_cancel import enqueue_cancel, enqueue_many

    enqueue_many([f"pl-flood-{n:05d}" for n in range(10_000)], account="shop-a", app=app)
    assert app.runtime.ledger.account_stats(["shop-a"])["shop-a"]["backlog"] > 9_000
    waits = []
    for n in range(3):
        link = sandbox.create_link(f"pl-fair-{n}")
        began = time.time()
        enqueue_cancel(link, account="shop-b", app=app)
        seen = wait_for(lambda: puts_of(sandbox, [link]), 10, interval=0.05, message="shop-b's PUT")
        waits.append(seen[0]["timestamp"] - began)
        time.sleep(1.0)
    assert max(waits) < 2.0, waits
    assert app.runtime.ledger.account_stats(["shop-a"])["shop-a"]["backlog"] > 9_000  # still waiting its turn
    app.runtime.redis.delete(app.runtime.keys.account_key("shop-a", "backlog"))


def test_accounts_added_and_removed_at_run_time(redis_url, sandbox, tmp_path, services):
    """shop-e, added to the file while the worker runs (its secret in a variable the worker
    has), is used within a minute; shop-a, removed with cancels live (retrying through its
    outage), has them end failed/rejected after the reload, naming it."""
    path = write_private(tmp_path / "accounts.toml", accounts_toml(["shop-a"]))
    env = service_env(redis_url, sandbox.url, PLURAL_ACCOUNTS_FILE=str(path),
                      CANCEL_RETRY_BASE="0.5", CANCEL_RETRY_CAP="1", SHOP_E_SECRET=CREDENTIALS["ide"])
    services.append(start_worker(env))
    app = use_settings(redis_url, sandbox.url)
    wait_for(lambda: "shop-a" in app.runtime.published_accounts(), 10, message="shop-a published")
    from plural_cancel import enqueue_cancel, enqueue_many

    sandbox.set_faults(account="ida", error_rates={"503": 1.0})
    live = enqueue_many(sandbox.create_links(3, prefix="pl-gone-"), account="shop-a", app=app)
    wait_for(lambda: all(s["last_error"] and s["state"] != "failed" for s in statuses(app, live)), 15,
             message="shop-a's cancels tried and retrying")

    added = time.monotonic()
    write_private(path, accounts_toml(["shop-e"], secret_env=["shop-e"]))
    wait_for(lambda: "shop-e" in app.runtime.published_accounts(), 60, interval=0.5, message="shop-e published")
    assert time.monotonic() - added < 60
    link = sandbox.create_links(1, prefix="pl-added-")[0]
    rid = enqueue_cancel(link, account="shop-e", app=app)
    assert ended(app, [rid], 15)[0]["outcome"] == "cancelled"
    assert {r["account"] for r in puts_of(sandbox, [link])} == {"ide"}

    gone = ended(app, live, 20)
    assert {(s["state"], s["outcome"], s["last_error"]["code"]) for s in gone} == {
        ("failed", "rejected", "UNKNOWN_ACCOUNT")}
    assert all("'shop-a'" in s["last_error"]["message"] for s in gone)


@pytest.mark.parametrize("text, mode, says", [
    ('[accounts.shop-a]\nclient_id = "ida"\nclient_secret = "secret-a"\n', 0o644, "chmod 600"),
    ('[accounts.shop-a]\nclient_id = "ida"\nclient_secret = "secret-a"\nrate_limit = "fast"\n', 0o600,
     "account 'shop-a': rate_limit"),
])
def test_a_bad_accounts_file_stops_the_worker_with_one_line(tmp_path, text, mode, says):
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    path.chmod(mode)
    env = service_env("redis://127.0.0.1:1/0", "http://127.0.0.1:9/api", PLURAL_ACCOUNTS_FILE=str(path))
    env.pop("PLURAL_CLIENT_ID")
    env.pop("PLURAL_CLIENT_SECRET")
    done = subprocess.run([CELERY, "-A", "worker", "worker"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plural-cancel: configuration error: ") and says in lines[0], lines
    assert "secret-a" not in done.stderr + done.stdout
    assert os.fspath(path) in lines[0]
