"""The ledger's scripts with many accounts, against a real Redis: one live cancel per
(account, link), one Request-ID across accounts, each account's own counts and backlog, and
the schedule's slot per (account, link)."""

from __future__ import annotations

import time

from plural_cancel.config.settings import Settings
from plural_cancel.worker.attempts import Attempts
from plural_cancel.worker.breaker import RedisCircuitBreaker
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ledger import Ledger
from plural_cancel.worker.ratelimit import RedisRateLimiter
from plural_cancel.worker.schedule import Schedule
from tests.support.scripts import claim

QUEUE = Settings.cancel_queue
LINK = "pl-acct-1"


def ledger_for(client, **overrides) -> Ledger:
    options = {"result_ttl": 3600, "stall_timeout": 60.0, "rate": 10.0, "queue": QUEUE}
    return Ledger(client, keys=Keys(), **{**options, **overrides})


def attempts_for(ledger: Ledger, account: str) -> Attempts:
    keys = ledger.keys
    breaker = RedisCircuitBreaker(ledger.redis, keys.account_key(account, "breaker"), window=10, min_links=5,
                                  failure_rate=0.5, cooldown=30)
    limiter = RedisRateLimiter(ledger.redis, keys.account_key(account, "ratelimit"), rate=100.0)
    return Attempts(ledger, breaker, limiter, account=account)


def test_one_live_cancel_per_account_and_link(redis_client):
    ledger = ledger_for(redis_client)
    assert ledger.create_many([("a-1", LINK), ("a-2", LINK)], account="shop-a") == [1, 2]  # the second follows
    assert ledger.create_many([("b-1", LINK)], account="shop-b") == [1]  # another account's: a cancel of its own
    assert ledger.create_many([("d-1", LINK)]) == [1]  # and the default account's
    assert redis_client.get("plural-cancel:link:shop-a:pl-acct-1") == b"a-1"
    assert redis_client.get("plural-cancel:link:shop-b:pl-acct-1") == b"b-1"
    assert redis_client.get("plural-cancel:link:pl-acct-1") == b"d-1"  # as before accounts
    assert ledger.status("a-2")["follows"] == "a-1"
    assert [ledger.status(rid)["account"] for rid in ("a-1", "b-1", "d-1")] == ["shop-a", "shop-b", "default"]
    assert b"account" not in redis_client.hkeys(ledger.keys.record("d-1"))  # the default's costs no bytes


def test_a_request_id_names_one_cancel_across_accounts(redis_client):
    ledger = ledger_for(redis_client)
    assert ledger.create_many([("rid", LINK)], account="shop-a") == [1]
    assert ledger.create_many([("rid", LINK)], account="shop-a") == [0]  # the same cancel
    assert ledger.create_many([("rid", LINK)], account="shop-b") == [-1]
    assert ledger.create_many([("rid", LINK)]) == [-1]
    # A message sent by name under another account's name: refused, naming whose it is.
    verdict = claim(ledger, "rid", LINK, "owner", lease=30, account="shop-b")
    assert (verdict.verdict, verdict.link) == ("mismatch", "shop-a:pl-acct-1")


def test_each_account_counts_its_own_and_its_events_name_it(redis_client):
    ledger = ledger_for(redis_client)
    ledger.create_many([("a-1", "pl-1"), ("a-2", "pl-2"), ("a-3", "pl-3")], account="shop-a")
    ledger.create_many([("b-1", "pl-1")], account="shop-b", hold=True)
    assert claim(ledger, "a-1", "pl-1", "o", lease=30, account="shop-a").verdict == "claimed"
    own = ledger.account_stats(["shop-a", "shop-b", "default"])
    assert own["shop-a"] == {"active": {"queued": 2, "running": 1, "retrying": 0}, "backlog": 0}
    assert own["shop-b"] == {"active": {"queued": 1, "running": 0, "retrying": 0}, "backlog": 1}
    assert own["default"]["active"] == {"queued": 0, "running": 0, "retrying": 0}
    ledger.create_many([("d-1", "pl-1")], hold=True)
    fleet = ledger.stats()
    assert fleet["active"] == {"queued": 4, "running": 1, "retrying": 0}  # the fleet's
    assert fleet["backlog"] == 2  # shop-b's and the default account's
    attempts_for(ledger, "shop-a").finish("a-1", "pl-1", "o", state="succeeded", outcome="cancelled", attempted=True)
    assert ledger.account_stats(["shop-a"])["shop-a"]["active"]["running"] == 0
    [(_, event)] = redis_client.xrange(ledger.keys.events)
    assert (event[b"request_id"], event[b"account"]) == (b"a-1", b"shop-a")
    assert redis_client.get("plural-cancel:link:shop-a:pl-1") is None  # freed: the next cancel leads


def test_each_accounts_backlog_has_a_room_of_its_own(redis_client):
    """shop-a at 1/s holds 100, shop-b at 10/s holds 100: in 2 s ahead the pump takes about 2 of
    shop-a's and 20 of shop-b's, and an open breaker holds only its own account's back."""
    ledger = ledger_for(redis_client)
    redis_client.hset(ledger.keys.accounts, mapping={"shop-a": 1, "shop-b": 10, "default": 10})
    ledger.create_many([(f"a-{n:03d}", f"pl-{n:03d}") for n in range(100)], account="shop-a", hold=True)
    ledger.create_many([(f"b-{n:03d}", f"pl-{n:03d}") for n in range(100)], account="shop-b", hold=True)
    taken = ledger.take_due(10, ahead=2.0, pacing=1.0)
    by_account = {}
    for rid, link, account in taken:
        by_account.setdefault(account, []).append(rid)
    assert (len(by_account["shop-a"]), len(by_account["shop-b"])) == (2, 20)
    assert by_account["shop-a"] == ["a-000", "a-001"]  # oldest first
    assert ledger.take_due(10, ahead=2.0, pacing=1.0) == []  # what was taken fills each room
    redis_client.hset(ledger.keys.account_key("shop-b", "breaker"), mapping={"state": "open"})
    ledger.create_many([("b-late", "pl-late")], account="shop-b", hold=True)
    redis_client.delete(ledger.keys.stats + ":shop-a")  # shop-a's taken ones ran and ended
    taken = ledger.take_due(10, ahead=2.0, pacing=1.0)
    assert {account for _, _, account in taken} == {"shop-a"}  # shop-b's breaker holds only shop-b's


def test_an_account_with_an_empty_backlog_leaves_the_pumps_round(redis_client):
    ledger = ledger_for(redis_client)
    ledger.create_many([("a-1", "pl-1")], account="shop-a", hold=True)
    assert redis_client.smembers(ledger.keys.backlogs) == {b"shop-a"}
    assert len(ledger.take_due(10, ahead=2.0)) == 1
    ledger.take_due(10, ahead=2.0)
    assert redis_client.smembers(ledger.keys.backlogs) == set()


def test_a_dead_letter_retried_keeps_its_account(redis_client):
    ledger = ledger_for(redis_client)
    ledger.create_many([("dead", LINK)], account="shop-a")
    claim(ledger, "dead", LINK, "o", lease=30, account="shop-a")
    attempts_for(ledger, "shop-a").finish("dead", LINK, "o", state="failed", outcome="auth_failed", attempted=True)
    assert ledger.requeue(["dead"]) == [("dead", "requeued", LINK, "shop-a")]
    assert redis_client.get("plural-cancel:link:shop-a:pl-acct-1") == b"dead"
    assert ledger.status("dead")["account"] == "shop-a"


def test_a_link_is_scheduled_once_per_account(redis_client):
    ledger = ledger_for(redis_client)
    schedule = Schedule(redis_client, fired_ttl=3600)
    at = time.time() - 1
    assert schedule.put(LINK, at, "s-a", replace=False, account="shop-a") == ("scheduled", "s-a")
    assert schedule.put(LINK, at, "s-b", replace=False, account="shop-b") == ("scheduled", "s-b")
    assert schedule.put(LINK, at, "s-d", replace=False) == ("scheduled", "s-d")
    assert schedule.get(LINK, "shop-a")["request_id"] == "s-a"
    assert schedule.remove(LINK, "shop-b") == ("removed", "s-b")
    assert schedule.get(LINK, "shop-b") is None and schedule.get(LINK)["request_id"] == "s-d"
    fired = {(f.request_id, f.payment_link_id, f.account, f.result) for f in schedule.fire(ledger, limit=10)}
    assert fired == {("s-a", LINK, "shop-a", "enqueued"), ("s-d", LINK, "default", "enqueued")}
    assert ledger.status("s-a")["account"] == "shop-a"
    assert schedule.get(LINK, "shop-a")["state"] == "fired"
    assert ledger.account_stats(["shop-a"])["shop-a"]["active"]["queued"] == 1


def test_a_refused_message_keeps_its_valid_account(redis_client):
    ledger = ledger_for(redis_client)
    error = {"http_status": None, "code": "MALFORMED_MESSAGE", "message": "x"}
    assert ledger.reject("rej-1", LINK, error, "shop-a")
    assert ledger.status("rej-1")["account"] == "shop-a"


def test_followers_take_no_room_from_their_accounts_backlog(redis_client):
    """A second cancel of a held link follows it and is never sent: it must not count as work
    about to run, or the held cancels it follows would never be let out."""
    ledger = ledger_for(redis_client)
    redis_client.hset(ledger.keys.accounts, "shop-a", 10)
    links = [f"pl-{n:03d}" for n in range(100)]
    ledger.create_many([(f"lead-{n:03d}", link) for n, link in enumerate(links)], account="shop-a", hold=True)
    ledger.create_many([(f"again-{n:03d}", link) for n, link in enumerate(links[:40])], account="shop-a")
    assert ledger.account_stats(["shop-a"])["shop-a"]["active"]["queued"] == 140
    taken = ledger.take_due(0, ahead=2.0, pacing=1.0)
    assert len(taken) == 20 and {rid[:5] for rid, _, _ in taken} == {"lead-"}


def test_the_default_accounts_backlog_is_pumped_though_the_backlogs_set_never_named_it(redis_client):
    """Cancels held before accounts (an upgrade with a backlog): the list is not empty, so no
    create since has added ``default`` to the backlogs set; the pump looks at it anyway."""
    ledger = ledger_for(redis_client)
    ledger.create_many([(f"old-{n}", f"pl-{n}") for n in range(3)], hold=True)
    redis_client.delete(ledger.keys.backlogs)  # as the version before accounts left it
    ledger.create_many([("new-0", "pl-new")], hold=True)
    assert not redis_client.sismember(ledger.keys.backlogs, "default")
    assert [rid for rid, _ in ledger.take_due(0, ahead=2.0, pacing=1.0)] == ["old-0", "old-1", "old-2", "new-0"]


def test_an_account_slower_than_one_call_in_the_look_ahead_still_drains_one_at_a_time(redis_client):
    ledger = ledger_for(redis_client)
    redis_client.hset(ledger.keys.accounts, "shop-slow", 0.2)  # 0.4 of a call in 2 s
    ledger.create_many([(f"s-{n}", f"pl-{n}") for n in range(3)], account="shop-slow", hold=True)
    assert [rid for rid, *_ in ledger.take_due(0, ahead=2.0, pacing=1.0)] == ["s-0"]
    assert ledger.take_due(0, ahead=2.0, pacing=1.0) == []  # the one taken is queued: busy
    claim(ledger, "s-0", "pl-0", "o", lease=30, account="shop-slow")
    attempts_for(ledger, "shop-slow").finish("s-0", "pl-0", "o", state="succeeded", outcome="cancelled",
                                             attempted=True)
    assert [rid for rid, *_ in ledger.take_due(0, ahead=2.0, pacing=1.0)] == ["s-1"]


def test_an_open_breaker_holds_the_backlog_only_until_it_is_due_to_reopen(redis_client):
    """After its reopening time a probe decides, which needs a delivery: an account no worker
    serves any more (removed from the file) must still have its held cancels delivered, to be
    refused."""
    ledger = ledger_for(redis_client)
    ledger.create_many([("g-0", "pl-0")], account="shop-gone", hold=True)
    breaker = ledger.keys.account_key("shop-gone", "breaker")
    redis_client.hset(breaker, mapping={"state": "open", "reopens_at": time.time() + 60})
    assert ledger.take_due(0, ahead=2.0, pacing=1.0) == []
    redis_client.hset(breaker, "reopens_at", time.time() - 1)
    assert ledger.take_due(0, ahead=2.0, pacing=1.0) == [("g-0", "pl-0", "shop-gone")]


def test_records_live_from_before_accounts_count_as_the_default_accounts_when_they_end(redis_client):
    """An upgrade: the fleet's counts hold live records that no account's counts do. The first
    worker to publish accounts copies them to the default account's, once."""
    ledger = ledger_for(redis_client)
    ledger.create_many([("old-1", "pl-1"), ("old-2", "pl-2")])
    redis_client.delete(ledger.keys.account_key("default", "stats"))  # as the version before accounts left it
    assert ledger.seed_account_stats()
    assert ledger.account_stats(["default"])["default"]["active"]["queued"] == 2
    claim(ledger, "old-1", "pl-1", "o", lease=30)
    attempts_for(ledger, "default").finish("old-1", "pl-1", "o", state="succeeded", outcome="cancelled",
                                           attempted=True)
    assert ledger.account_stats(["default"])["default"]["active"] == {"queued": 1, "running": 0, "retrying": 0}
    redis_client.hset(ledger.keys.accounts, "default", 10)
    assert not ledger.seed_account_stats()  # once: accounts are published from then on


def test_every_accounts_secret_is_masked_by_value_those_added_at_run_time_too(redis_url, tmp_path):
    """A secret of the accounts file is not shaped like one (no ``client_secret=`` before it):
    the worker's one redactor knows each by value, and learns those of accounts added."""
    from plural_cancel.worker.accounts import refresh
    from plural_cancel.worker.runtime import Runtime

    path = tmp_path / "accounts.toml"
    path.write_text('[accounts.shop-a]\nclient_id = "ida"\nclient_secret = "Zq8-first-secret"\n')
    path.chmod(0o600)
    from plural_cancel.config.accounts import RELOAD_INTERVAL, AccountBook

    rt = Runtime(Settings.from_env({"REDIS_URL": redis_url, "PLURAL_ACCOUNTS_FILE": str(path)}))
    now = [0.0]
    rt.__dict__["book"] = AccountBook(rt.settings, clock=lambda: now[0])  # a clock the test steps
    refresh(rt)
    assert rt.redactor.text("Plural said: Zq8-first-secret is wrong") == "Plural said: [Filtered] is wrong"
    path.write_text(path.read_text() + '[accounts.shop-b]\nclient_id = "idb"\nclient_secret = "Yp7-added-later"\n')
    now[0] += RELOAD_INTERVAL + 5  # the next look at the file, and past the racy window of its timestamps
    assert refresh(rt)
    assert rt.redactor.text("echo Yp7-added-later") == "echo [Filtered]"
    assert set(rt.published_accounts()) == {"shop-a", "shop-b"}
    assert rt.ledger.redactor is rt.redactor  # what the ledger stores is masked by the same one
    rt.close()


def test_a_file_turned_bad_keeps_the_last_good_accounts_published_and_is_counted(redis_url, tmp_path):
    from plural_cancel.config.accounts import RELOAD_INTERVAL, AccountBook
    from plural_cancel.worker.accounts import refresh
    from plural_cancel.worker.runtime import Runtime

    path = tmp_path / "accounts.toml"
    path.write_text('[accounts.shop-a]\nclient_id = "ida"\nclient_secret_env = "SHOP_A_SECRET"\n')
    failures = []
    rt = Runtime(Settings.from_env({"REDIS_URL": redis_url, "PLURAL_ACCOUNTS_FILE": str(path)}),
                 on_reload_failure=failures.append)
    now = [0.0]
    rt.__dict__["book"] = AccountBook(rt.settings, {"SHOP_A_SECRET": "s3cret-a"}, clock=lambda: now[0],
                                      on_reload_failure=rt.on_reload_failure)
    refresh(rt)
    path.write_text('[accounts.shop-a]\nclient_id = "ida"\nclient_secret_env = "SHOP_A_SECRET"\nrate_limit = "fast"\n')
    now[0] += RELOAD_INTERVAL + 5
    assert not refresh(rt)
    assert len(failures) == 1 and "rate_limit" in str(failures[0])
    assert set(rt.published_accounts()) == {"shop-a"} and rt.lane("shop-a") is not None  # the last good ones
    rt.close()


def test_an_account_first_met_by_a_delivery_is_published_and_its_secret_masked(redis_url, tmp_path):
    """A cancel of an account just added to the file makes the worker read the file at once
    (``AccountBook.get``): the next refresh must still publish the account and learn its secret,
    though its own look at the file then finds nothing new."""
    from plural_cancel.config.accounts import AccountBook
    from plural_cancel.worker.accounts import refresh
    from plural_cancel.worker.runtime import Runtime

    path = tmp_path / "accounts.toml"
    path.write_text('[accounts.shop-a]\nclient_id = "ida"\nclient_secret = "Zq8-first-secret"\n')
    path.chmod(0o600)
    rt = Runtime(Settings.from_env({"REDIS_URL": redis_url, "PLURAL_ACCOUNTS_FILE": str(path)}))
    now = [0.0]
    rt.__dict__["book"] = AccountBook(rt.settings, clock=lambda: now[0])
    refresh(rt)
    path.write_text(path.read_text() + '[accounts.shop-b]\nclient_id = "idb"\nclient_secret = "Yp7-added-later"\n')
    now[0] += 5  # within the reload interval: only a delivery's unknown name looks now
    assert rt.lane("shop-b") is not None
    refresh(rt)
    assert "shop-b" in rt.published_accounts()
    assert rt.redactor.text("echo Yp7-added-later") == "echo [Filtered]"
    rt.close()
