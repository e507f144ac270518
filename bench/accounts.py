"""What many Plural accounts cost: cancels with 100 accounts against 1, the bytes of a pending
cancel of a named account, and 1,000 accounts in the file.

Run from the repository root (about 3 minutes)::

    .venv/bin/python bench/accounts.py [--count 2000] [--rounds 2] [--accounts 100] [--pending 100000]
        [--file-accounts 1000]

It starts its own ``redis-server`` (AOF on, ``appendfsync everysec``, as deployed) and the
sandbox (taking any credentials, so any number of accounts), then:

1. **Per-cancel cost, 1 account against ``--accounts``**, alternating over ``--rounds``: one
   ``celery -A worker worker`` (threads x 128) with an accounts file of ``--accounts``
   accounts (each at ``rate_limit`` 10000, so no limiter binds) beside the default account
   (``PLURAL_RATE_LIMIT=10000``); ``--count`` cancels enqueued in ``--accounts`` calls of
   ``enqueue_many``, all for ``default`` (1 account), or one call per account; the clock runs
   from the first enqueue until the ledger counts none live. Per run: cancels per second and
   Redis commands per cancel (``INFO commandstats``, those inside Lua scripts included, less
   this driver's own). The ratios many/one use each mode's best rate and its mean commands.
2. **Bytes per pending cancel**: ``--pending`` cancels held in a backlog (``enqueue_many``
   with no worker running, so none is published), for ``default`` and for an account named
   ``shop-0042`` (its name in every record): Redis's ``used_memory`` growth per cancel.
3. **``--file-accounts`` accounts in the file**: a worker's start-up (launch to "ready.")
   with the file against without it, and Redis bytes per account at rest once each account
   has run one cancel (its token, breaker, pace and counts, and its published name), summed
   with ``MEMORY USAGE`` over the keys that name it; and what one read of the shared
   metrics costs then (``worker.metrics.snapshot``, every account's series), against one
   with the default account alone.
4. **A flood sent by name**: ``--flood`` messages of one account (``send_task``, 5 calls/s)
   pushed onto the queue at once, then one cancel of another account by ``enqueue_cancel``:
   seconds until Plural sees it (the queue is first in, first out: the workers must take
   the flood's messages, each deferred to its account's slot, before they reach it), against
   the same cancel after ``enqueue_many`` of the same flood (held in the backlog).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import use_settings  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.sandbox import start_sandbox_process  # noqa: E402
from tests.support.workers import CeleryProcess, service_env  # noqa: E402

RATE = 10_000
"""Calls per second of every account: no limiter binds, so the runs measure the cost alone."""


def accounts_file(count: int, directory: Path) -> Path:
    path = directory / f"accounts-{count}.toml"
    path.write_text("".join(f'[accounts.shop-{n:04d}]\nclient_id = "client-{n:04d}"\nclient_secret = "s-{n:04d}"\n'
                            f"rate_limit = {RATE}\n" for n in range(count)))
    path.chmod(0o600)
    return path


def info_calls(client: redis.Redis) -> int:
    info = client.execute_command("INFO", "commandstats")
    return sum(v["calls"] for k, v in info.items() if k.startswith("cmdstat_"))


def start(env: dict[str, str]) -> tuple[CeleryProcess, float]:
    began = time.monotonic()
    worker = CeleryProcess("worker", env, ["--loglevel=INFO", "--concurrency=128", "-n",
                                           f"bench{time.monotonic_ns()}@%h", "--without-mingle", "--without-gossip"])
    worker.wait_ready(timeout=120, marker="ready.")
    return worker, time.monotonic() - began


def run(app, client: redis.Redis, sandbox, names: list[str], count: int, calls: int) -> tuple[float, float]:
    """Enqueue ``count`` cancels in ``calls`` calls of ``enqueue_many``, the accounts ``names``
    taking turns; (cancels per second, Redis commands per cancel)."""
    from plural_cancel import enqueue_many

    links = sandbox.create_links(count, prefix=f"pl-b{time.monotonic_ns() % 10**9}-")
    share = count // calls
    time.sleep(1.0)  # the workers' idle pump settles
    calls0 = info_calls(client)
    began = time.monotonic()
    for n in range(calls):
        enqueue_many(links[n * share:(n + 1) * share], account=names[n % len(names)], app=app)
    polls = 0
    while True:
        stats = client.hgetall("plural-cancel:stats")
        polls += 1
        if sum(int(stats.get(s.encode(), 0)) for s in ("queued", "running", "retrying")) <= 0:
            break
        time.sleep(0.05)
    seconds = time.monotonic() - began
    commands = info_calls(client) - calls0 - polls - 1
    return share * calls / seconds, commands / (share * calls)


def bytes_per_pending(server: RedisServer, sandbox, pending: int) -> dict[str, float]:
    from plural_cancel import enqueue_many

    out = {}
    for name in ("default", "shop-0042"):
        client = redis.Redis.from_url(server.url)
        client.flushall()
        client.hset("plural-cancel:accounts", mapping={"default": 0.01, "shop-0042": 0.01})
        app = use_settings(server.url, sandbox.url, PLURAL_RATE_LIMIT=0.01)  # nothing fits ahead: all held
        before = client.info("memory")["used_memory"]
        for start_at in range(0, pending, 10_000):
            enqueue_many([f"pl-p-{n:07d}" for n in range(start_at, min(pending, start_at + 10_000))],
                         account=name, app=app)
        out[name] = (client.info("memory")["used_memory"] - before) / pending
        app.close()
        client.close()
    return out


def file_accounts(server: RedisServer, sandbox, count: int, directory: Path) -> dict[str, float]:
    from plural_cancel import enqueue_many

    client = redis.Redis.from_url(server.url)
    client.flushall()
    env = service_env(server.url, sandbox.url, PLURAL_RATE_LIMIT=RATE)
    worker, bare = start(env)
    worker.stop()
    path = accounts_file(count, directory)
    worker, loaded = start({**env, "PLURAL_ACCOUNTS_FILE": str(path)})
    try:
        app = use_settings(server.url, sandbox.url)
        while len(client.hkeys("plural-cancel:accounts")) < count + 1:
            time.sleep(0.1)
        for n in range(count):
            enqueue_many([f"pl-f-{n:04d}"], account=f"shop-{n:04d}", app=app)
        while sum(int(v) for k, v in client.hgetall("plural-cancel:stats").items()
                  if k in (b"queued", b"running", b"retrying")) > 0:
            time.sleep(0.1)
        time.sleep(2.5)  # the limiters' TATs expire: at rest
        per_account = 0
        for key in client.scan_iter("plural-cancel:*", count=1000):
            text = key.decode()
            if "shop-" in text and ":req:" not in text and ":link:" not in text:
                per_account += client.memory_usage(key) or 0
        published = client.memory_usage("plural-cancel:accounts") or 0
        scrape_many = snapshot_seconds(app)
        saved = client.hgetall("plural-cancel:accounts")
        client.delete("plural-cancel:accounts")
        client.hset("plural-cancel:accounts", "default", RATE)
        scrape_one = snapshot_seconds(app)
        client.delete("plural-cancel:accounts")
        client.hset("plural-cancel:accounts", mapping=saved)
    finally:
        worker.stop()
    return {"start_bare": bare, "start_file": loaded, "bytes_per_account": (per_account + published) / count,
            "published_bytes": published / count, "scrape_many": scrape_many, "scrape_one": scrape_one}


def snapshot_seconds(app, repeat: int = 5) -> float:
    """The best of ``repeat`` reads of the shared metrics, seconds."""
    from plural_cancel.worker import metrics

    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        metrics.snapshot(app.runtime)
        best = min(best, time.perf_counter() - began)
    return best


def flood(server: RedisServer, sandbox, count: int, directory: Path) -> dict[str, float]:
    """Seconds until another account's cancel reaches Plural behind ``count`` cancels of one
    account: sent by name (all on the queue) and by ``enqueue_many`` (held)."""
    from plural_cancel import enqueue_cancel, enqueue_many

    path = directory / "flood.toml"
    path.write_text('[accounts.slow]\nclient_id = "slow"\nclient_secret = "s"\nrate_limit = 5\n'
                    '[accounts.other]\nclient_id = "other"\nclient_secret = "o"\nrate_limit = 10\n')
    path.chmod(0o600)
    out = {}
    for mode in ("send_task", "enqueue_many"):
        client = redis.Redis.from_url(server.url)
        client.flushall()
        worker, _ = start(service_env(server.url, sandbox.url, PLURAL_ACCOUNTS_FILE=str(path)))
        try:
            app = use_settings(server.url, sandbox.url)
            while len(client.hkeys("plural-cancel:accounts")) < 3:
                time.sleep(0.1)
            links = [f"pl-flood-{n:05d}" for n in range(count)]
            if mode == "send_task":
                with app.producer_or_acquire() as producer:
                    for n, link in enumerate(links):
                        app.send_task("tasks.cancel_payment_link", queue=app.conf.task_default_queue,
                                      producer=producer, kwargs={"payment_link_id": link,
                                                                 "request_id": f"flood-{n}", "account": "slow"})
            else:
                enqueue_many(links, account="slow", app=app)
            link = sandbox.create_links(1, prefix=f"pl-other-{mode}-")[0]
            since = max((r["seq"] for r in sandbox.requests()), default=0)
            began = time.time()
            enqueue_cancel(link, account="other", app=app)
            while True:
                fresh = sandbox.requests(since)
                since = max((r["seq"] for r in fresh), default=since)
                seen = [r for r in fresh if r["method"] == "PUT" and r["link_id"] == link]
                if seen or time.time() - began > 300:
                    break
                time.sleep(0.1)
            out[mode] = seen[0]["timestamp"] - began if seen else float("inf")
        finally:
            worker.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--file-accounts", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=10_000)
    args = parser.parse_args(argv)

    # Every worker a process of its own, as deployed: a start-up measured from a fork of a
    # preloaded process (the tests' zygote) would leave the reading of the file out.
    os.environ["TESTS_NO_ZYGOTE"] = "1"
    directory = Path(tempfile.mkdtemp(prefix="bench-accounts-"))
    server = RedisServer(prefix="bench-redis-", aof=True)
    sandbox = start_sandbox_process(extra_args=["--no-demo-links"])
    try:
        client = redis.Redis.from_url(server.url)
        path = accounts_file(args.accounts, directory)
        env = service_env(server.url, sandbox.url, PLURAL_RATE_LIMIT=RATE, PLURAL_ACCOUNTS_FILE=str(path))
        worker, _ = start(env)
        app = use_settings(server.url, sandbox.url, PLURAL_RATE_LIMIT=RATE)
        while len(client.hkeys("plural-cancel:accounts")) < args.accounts + 1:
            time.sleep(0.1)
        many_names = [f"shop-{n:04d}" for n in range(args.accounts)]
        run(app, client, sandbox, ["default"], 300, 3)  # warm-up: tokens, connections
        run(app, client, sandbox, many_names, args.accounts * 3, args.accounts)
        figures: dict[str, list[tuple[float, float]]] = {"one": [], "many": []}
        print(f"{'round':<7}{'accounts':>9}{'cancels/s':>11}{'cmds/cancel':>13}")
        for r in range(args.rounds):
            for mode in (("one", "many") if r % 2 == 0 else ("many", "one")):
                names = ["default"] if mode == "one" else many_names
                # The same calls either way (one enqueue_many per account's share), so that what
                # differs is the accounts alone.
                rate, cmds = run(app, client, sandbox, names, args.count, args.accounts)
                figures[mode].append((rate, cmds))
                print(f"{r:<7}{len(names):>9}{rate:>11.0f}{cmds:>13.2f}", flush=True)
        worker.stop()
        best = {mode: max(rate for rate, _ in runs) for mode, runs in figures.items()}
        cmds = {mode: statistics.mean(c for _, c in runs) for mode, runs in figures.items()}
        print(f"many/one: cancels/s x{best['many'] / best['one']:.3f} (best of each), "
              f"commands per cancel x{cmds['many'] / cmds['one']:.3f} (mean of each)")

        pending = bytes_per_pending(server, sandbox, args.pending)
        print(f"bytes per pending cancel ({args.pending} held): default {pending['default']:.0f}, "
              f"named account {pending['shop-0042']:.0f}")

        fa = file_accounts(server, sandbox, args.file_accounts, directory)
        print(f"{args.file_accounts} accounts in the file: worker start-up {fa['start_file']:.2f} s "
              f"(x{fa['start_file'] / fa['start_bare']:.2f} the {fa['start_bare']:.2f} s without the file); "
              f"Redis bytes per account at rest {fa['bytes_per_account']:.0f} "
              f"(of which its published name {fa['published_bytes']:.0f}); one read of the shared metrics "
              f"{fa['scrape_many'] * 1000:.0f} ms (x{fa['scrape_many'] / fa['scrape_one']:.0f} the "
              f"{fa['scrape_one'] * 1000:.1f} ms of the default account alone)")

        waits = flood(server, sandbox, args.flood, directory)
        print(f"another account's cancel behind {args.flood} of one account at 5/s reached Plural in "
              f"{waits['send_task']:.2f} s when they were sent by name, {waits['enqueue_many']:.2f} s when "
              f"they were enqueued with enqueue_many")
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    finally:
        sandbox.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
