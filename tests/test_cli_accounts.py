"""``--account`` on the command line (#23): each command the contract names works for one Plural
account, an unknown account is one line and exit 2 with nothing written, and ``check`` gets a
token for each account.

Real things throughout: a redis-server, a sandbox process that knows four accounts (each
given by ``--account CLIENT_ID:SECRET``), a worker reading an accounts file whose secrets
come from variables (``client_secret_env``), and the console script's ``main`` run in this
process (``tests/support/cli.py``). Producers here have no accounts file unless a test says
so: they learn the names the worker published in Redis.
"""

from __future__ import annotations

import base64
import json
import re

import pytest
import redis

from tests.conftest import wait_for
from tests.support.cli import run as cli
from tests.support.sandbox import start_sandbox_process
from tests.support.workers import service_env, start_worker

SECRETS = {"test-client": "test-secret-do-not-leak", "cid-shop-a": "secret-of-shop-a",
           "cid-shop-b": "secret-of-shop-b", "cid-shop-c": "secret-of-shop-c"}
"""The sandbox's accounts: client id -> secret."""

ACCOUNTS_FILE = """\
[accounts.shop-a]
client_id = "cid-shop-a"
client_secret_env = "SHOP_A_PLURAL_SECRET"

[accounts.shop-b]
client_id = "cid-shop-b"
client_secret_env = "SHOP_B_PLURAL_SECRET"

[accounts.shop-c]
client_id = "cid-shop-c"
client_secret_env = "SHOP_C_PLURAL_SECRET"
rate_limit = 1
"""
"""shop-c sends one cancel a second: a bulk of it stays live long enough for ``stats`` to see."""

SECRET_VARIABLES = {"SHOP_A_PLURAL_SECRET": SECRETS["cid-shop-a"], "SHOP_B_PLURAL_SECRET": SECRETS["cid-shop-b"],
                    "SHOP_C_PLURAL_SECRET": SECRETS["cid-shop-c"]}

RETRY = dict(CANCEL_RETRY_BUDGET="2", CANCEL_RETRY_BASE="0.2", CANCEL_RETRY_CAP="0.5", BREAKER_MIN_LINKS="1000")
"""A 2-second retry budget, so that an outage ends in ``gave_up`` quickly; no breaker opening."""


def producer_env(redis_url: str, plural_url: str, **extra: str) -> dict[str, str]:
    """A producer host's environment: the default account's credentials, no accounts file."""
    return service_env(redis_url, plural_url, **RETRY, **extra)


@pytest.fixture(scope="module")
def sandbox():
    proc = start_sandbox_process(accounts=SECRETS.items())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("accounts") / "accounts.toml"
    path.write_text(ACCOUNTS_FILE)
    return str(path)


@pytest.fixture(scope="module")
def system(module_redis_url, sandbox, accounts_file):
    """A worker for the default account and shop-a, -b and -c, once it has published them."""
    worker_env = producer_env(module_redis_url, sandbox.url, PLURAL_ACCOUNTS_FILE=accounts_file, **SECRET_VARIABLES)
    worker = start_worker(worker_env, concurrency=4)
    client = redis.Redis.from_url(module_redis_url)
    wait_for(lambda: {b"default", b"shop-a", b"shop-b", b"shop-c"} <= set(client.hkeys("plural-cancel:accounts")),
             15, message="the worker's accounts published")
    yield {"env": producer_env(module_redis_url, sandbox.url), "sandbox": sandbox, "redis": client}
    worker.stop()
    client.close()


@pytest.fixture(autouse=True)
def _healthy(sandbox):
    sandbox.reset_faults()
    yield
    sandbox.reset_faults()


def status(env, request_id: str) -> dict:
    result = cli(env, "status", request_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def finished(env, request_id: str, timeout: float = 30.0) -> dict:
    return wait_for(lambda: (s := status(env, request_id))["state"] in ("succeeded", "failed") and s,
                    timeout, message=f"cancel {request_id} terminal")


def puts_of(sandbox, link_id: str) -> list[tuple[str, str]]:
    """(request id, account's client id) of every cancel PUT the sandbox logged for ``link_id``."""
    return [(r["request_id"], r["account"]) for r in sandbox.requests()
            if r["method"] == "PUT" and r["link_id"] == link_id]


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- enqueue and status ------------------------------------------------------------------------


def test_enqueue_account_writes_a_record_and_a_message_that_name_it(redis_url, sandbox, accounts_file):
    """No worker: the message waits in the queue to be read. This producer has the accounts
    file (no worker has published any names in this database)."""
    env = producer_env(redis_url, sandbox.url, PLURAL_ACCOUNTS_FILE=accounts_file, **SECRET_VARIABLES)
    enqueued = cli(env, "enqueue", "pl-acct-queued-1", "--account", "shop-a")
    assert enqueued.returncode == 0, enqueued.stderr
    request_id = enqueued.stdout.strip()

    record = status(env, request_id)
    assert (record["account"], record["state"], record["payment_link_id"]) == ("shop-a", "queued", "pl-acct-queued-1")
    text = cli(env, "status", request_id)
    assert re.search(r"^account +shop-a$", text.stdout, re.M), text.stdout

    client = redis.Redis.from_url(redis_url)
    try:
        [stored] = client.lrange("plural-cancel", 0, -1)
    finally:
        client.close()
    _, kwargs, _ = json.loads(base64.b64decode(json.loads(stored)["body"]))
    assert kwargs == {"payment_link_id": "pl-acct-queued-1", "request_id": request_id, "account": "shop-a"}

    default = cli(env, "enqueue", "pl-acct-queued-2")  # no --account: the default account, as before
    assert status(env, default.stdout.strip())["account"] == "default"


def test_enqueue_account_is_cancelled_with_that_accounts_credentials(system):
    env, sandbox = system["env"], system["sandbox"]
    [link_id] = sandbox.create_links(1, prefix="pl-acct-enq-")
    enqueued = cli(env, "enqueue", link_id, "--account", "shop-b")
    assert enqueued.returncode == 0, enqueued.stderr
    request_id = enqueued.stdout.strip()
    record = finished(env, request_id)
    assert (record["outcome"], record["account"]) == ("cancelled", "shop-b")
    assert puts_of(sandbox, link_id) == [(request_id, "cid-shop-b")]


def test_schedule_and_unschedule_take_the_account(system):
    env = system["env"]
    scheduled = cli(env, "schedule", "pl-acct-later", "--at", "2031-01-01T00:00:00Z", "--account", "shop-a")
    assert scheduled.returncode == 0, scheduled.stderr
    # The default account's link of that id has nothing scheduled: a schedule is per (account, link).
    other = cli(env, "unschedule", "pl-acct-later")
    assert (other.returncode, one_line(other)) == (1, "plural-cancel: nothing scheduled for pl-acct-later")
    taken = cli(env, "unschedule", "pl-acct-later", "--account", "shop-a")
    assert (taken.returncode, taken.stdout) == (0, "unscheduled: pl-acct-later of account shop-a will not be "
                                                   "cancelled\n"), taken.stderr


# -- an unknown account ------------------------------------------------------------------------

UNKNOWN = [
    ("enqueue", "pl-acct-1"),
    ("bulk", "{file}"),
    ("schedule", "pl-acct-1", "--at", "2031-01-01T00:00:00Z"),
    ("unschedule", "pl-acct-1"),
    ("failed", "list"),
    ("failed", "retry", "--all"),
    ("stats",),
    ("stats", "--json"),
    ("check",),
]


def redis_contents(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key with its value (``DUMP``): what a command must leave as it found it."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


@pytest.mark.parametrize("args", UNKNOWN, ids=" ".join)
def test_an_unknown_account_is_exit_2_in_one_line_naming_account_and_nothing_is_written(
        args, redis_url, sandbox, accounts_file, tmp_path):
    env = producer_env(redis_url, sandbox.url, PLURAL_ACCOUNTS_FILE=accounts_file, **SECRET_VARIABLES)
    assert cli(env, "enqueue", "pl-acct-before", "--account", "shop-a").returncode == 0  # something to keep
    links = tmp_path / "links.txt"
    links.write_text("pl-acct-1\npl-acct-2\n")
    client = redis.Redis.from_url(redis_url)
    try:
        before = redis_contents(client)
        result = cli(env, *(a.format(file=links) for a in args), "--account", "shop-z")
        assert result.returncode == 2, (result.stdout, result.stderr)
        line = one_line(result)
        assert line.startswith("plural-cancel: account: 'shop-z' is not an account"), line
        assert "shop-a" in line  # the accounts it knows
        assert result.stdout == ""
        assert redis_contents(client) == before
    finally:
        client.close()


@pytest.mark.parametrize("name", ["shop z", "x" * 51])
def test_a_malformed_account_name_is_exit_2_naming_account(name, system):
    result = cli(system["env"], "enqueue", "pl-acct-1", "--account", name)
    assert result.returncode == 2
    assert one_line(result).startswith("plural-cancel: account: must be 1-50 characters")


# -- failed list and retry ---------------------------------------------------------------------


def failed_ids(env, *args: str) -> list[str]:
    result = cli(env, "failed", "list", "--json", "--limit", "0", *args)
    assert result.returncode == 0, result.stderr
    return [r["request_id"] for r in json.loads(result.stdout)]


def test_failed_list_and_retry_all_take_one_accounts_dead_letters(system):
    """shop-a's tokens are refused (its cancels end auth_failed) and shop-b cancels a link that
    does not exist (rejected); once shop-a is mended, retrying its dead letters sends those
    alone, with shop-a's credentials."""
    env, sandbox = system["env"], system["sandbox"]
    links_a = sandbox.create_links(2, prefix="pl-acct-auth-")
    sandbox.set_faults(account="cid-shop-a", reject_tokens=True)
    ids_a = [cli(env, "enqueue", link_id, "--account", "shop-a").stdout.strip() for link_id in links_a]
    id_b = cli(env, "enqueue", "pl-acct-no-such-link", "--account", "shop-b").stdout.strip()
    for request_id in ids_a:
        assert finished(env, request_id)["outcome"] == "auth_failed"
    assert finished(env, id_b)["outcome"] == "rejected"

    assert set(failed_ids(env, "--account", "shop-a")) == set(ids_a)
    assert id_b in failed_ids(env, "--account", "shop-b") and id_b in failed_ids(env)
    assert not set(ids_a) & set(failed_ids(env, "--account", "shop-b"))
    text = cli(env, "failed", "list", "--account", "shop-a")
    assert text.returncode == 0, text.stderr
    assert all(request_id in text.stdout for request_id in ids_a) and id_b not in text.stdout
    assert len(failed_ids(env, "--account", "shop-a", "--limit", "1")) == 1
    b_before = status(env, id_b)

    sandbox.reset_faults("cid-shop-a")  # the operator fixed shop-a's credentials
    retried = cli(env, "failed", "retry", "--all", "--account", "shop-a")
    assert (retried.returncode, retried.stdout) == (0, "requeued 2 failed cancels\n"), retried.stderr
    for link_id, request_id in zip(links_a, ids_a):
        record = finished(env, request_id)
        assert (record["outcome"], record["account"]) == ("cancelled", "shop-a")
        assert puts_of(sandbox, link_id)[-1] == (request_id, "cid-shop-a")
    assert failed_ids(env, "--account", "shop-a") == []
    assert status(env, id_b) == b_before  # another account's dead letter is left alone


def test_failed_retry_of_one_cancel_keeps_its_account(system):
    env, sandbox = system["env"], system["sandbox"]
    [link_id] = sandbox.create_links(1, prefix="pl-acct-retry-")
    sandbox.set_faults(account="cid-shop-b", outage=True, faults_skip_token=True)
    request_id = cli(env, "enqueue", link_id, "--account", "shop-b").stdout.strip()
    assert finished(env, request_id)["outcome"] == "gave_up"
    sandbox.reset_faults("cid-shop-b")

    with_account = cli(env, "failed", "retry", request_id, "--account", "shop-b")
    assert with_account.returncode == 2 and "--account goes with --all" in one_line(with_account)
    retried = cli(env, "failed", "retry", request_id)
    assert (retried.returncode, retried.stdout) == (0, f"requeued {request_id}\n"), retried.stderr
    record = finished(env, request_id)
    assert (record["outcome"], record["account"]) == ("cancelled", "shop-b")
    accounts = {account for _, account in puts_of(sandbox, link_id)}
    assert accounts == {"cid-shop-b"}  # never with the default account's credentials


# -- stats -------------------------------------------------------------------------------------


def test_stats_show_each_live_account_and_one_account_alone(system, tmp_path):
    """shop-c sends one cancel a second: ten of them stay live (most in its backlog) for a
    while, and only shop-c has anything live."""
    env, sandbox = system["env"], system["sandbox"]
    links = tmp_path / "links.txt"
    links.write_text("\n".join(sandbox.create_links(10, prefix="pl-acct-slow-")) + "\n")
    bulk = cli(env, "bulk", str(links), "--account", "shop-c")
    assert bulk.returncode == 0, bulk.stderr
    # Every cancel of shop-c still to send, over shop-c's own limit (one may have gone already).
    assert re.search(r"^backlog     10 enqueued; with (9|10) waiting in all, about \d+ s at 1/s$", bulk.stdout,
                     re.M), bulk.stdout

    text = cli(env, "stats")
    assert text.returncode == 0, text.stderr
    [line] = [line for line in text.stdout.splitlines() if line.startswith("account ")]
    match = re.fullmatch(r"account shop-c: queued (\d+), running (\d+), retrying 0, backlog (\d+), "
                         r"breaker closed, rate [\d.]+/s, throttled 0%", line)
    assert match, line
    assert sum(int(n) for n in match.groups()[:2]) >= 5 and int(match[3]) >= 3, line

    figures = json.loads(cli(env, "stats", "--json").stdout)
    assert set(figures["accounts"]) == {"default", "shop-a", "shop-b", "shop-c"}
    shop_c = figures["accounts"]["shop-c"]
    assert shop_c["rate"]["limit_per_second"] == 1 and shop_c["breaker"]["state"] == "closed"
    assert sum(shop_c["states"].values()) >= 5 and shop_c["backlog"] >= 3
    assert sum(figures["accounts"]["shop-a"]["states"].values()) == 0

    alone = cli(env, "stats", "--account", "shop-c", "--json")
    assert alone.returncode == 0, alone.stderr
    mine = json.loads(alone.stdout)
    assert mine["account"] == "shop-c" and set(mine) == {"account", "states", "backlog", "breaker", "rate"}
    assert mine["rate"]["limit_per_second"] == 1
    text = cli(env, "stats", "--account", "shop-c")
    assert text.returncode == 0, text.stderr
    assert [line.split()[0] for line in text.stdout.splitlines()] == ["account", "states", "backlog", "breaker",
                                                                      "rate"]
    assert text.stdout.startswith("account       shop-c\nstates        queued ")
    assert "limit 1/s" in text.stdout
    idle = json.loads(cli(env, "stats", "--account", "shop-a", "--json").stdout)
    assert idle["states"] == {"queued": 0, "running": 0, "retrying": 0} and idle["backlog"] == 0


# -- check -------------------------------------------------------------------------------------


def test_check_gets_a_token_for_each_account_and_fails_for_a_wrong_secret(system, tmp_path):
    """Two accounts in a file and no default one; shop-b's variable holds a wrong secret."""
    path = tmp_path / "accounts.toml"
    path.write_text('[accounts.shop-a]\nclient_id = "cid-shop-a"\nclient_secret_env = "SHOP_A_PLURAL_SECRET"\n'
                    '[accounts.shop-b]\nclient_id = "cid-shop-b"\nclient_secret_env = "SHOP_B_PLURAL_SECRET"\n')
    env = {k: v for k, v in system["env"].items() if k not in ("PLURAL_CLIENT_ID", "PLURAL_CLIENT_SECRET")}
    env.update(PLURAL_ACCOUNTS_FILE=str(path), SHOP_A_PLURAL_SECRET=SECRETS["cid-shop-a"],
               SHOP_B_PLURAL_SECRET="not-the-secret-of-b")

    result = cli(env, "check")
    assert result.returncode == 1, result.stderr
    tokens = [line for line in result.stdout.splitlines() if line.startswith("token ")]
    assert tokens[0] == "token shop-a: ok (client id cid-...)"
    assert tokens[1].startswith("token shop-b: FAILED (auth_failed: Generate Token refused the credentials")
    assert len(tokens) == 2
    assert result.stdout.startswith("settings   ok\nredis      ok")
    assert one_line(result) == "plural-cancel: no Plural token for 1 of 2 accounts: shop-b"
    assert "not-the-secret-of-b" not in result.stdout + result.stderr
    assert SECRETS["cid-shop-a"] not in result.stdout + result.stderr

    one = cli(env, "check", "--account", "shop-a")
    assert one.returncode == 0, one.stderr
    assert [line for line in one.stdout.splitlines() if line.startswith("token ")] == [
        "token shop-a: ok (client id cid-...)"]
    bad = cli(env, "check", "--account", "shop-b")
    assert bad.returncode == 1 and one_line(bad) == "plural-cancel: no Plural token for 1 of 1 account: shop-b"
    unknown = cli(env, "check", "--account", "shop-c")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert one_line(unknown).startswith("plural-cancel: account: 'shop-c' is not an account of this host")


def test_check_without_any_account_names_the_missing_variable(system):
    env = {k: v for k, v in system["env"].items() if k not in ("PLURAL_CLIENT_ID", "PLURAL_CLIENT_SECRET")}
    result = cli(env, "check")
    assert result.returncode == 2 and "PLURAL_CLIENT_ID" in one_line(result)
