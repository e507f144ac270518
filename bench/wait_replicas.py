"""What ``REDIS_WAIT_REPLICAS=1`` costs a producer: ``enqueue_many`` and ``enqueue_cancel``
with and without Redis ``WAIT 1`` after the ledger's records, same run.

Run from the repository root::

    .venv/bin/python bench/wait_replicas.py [--batches 200] [--batch 100] [--singles 2000] [--rounds 3]

It starts a master and one replica (``redis-server``, no persistence, both on this host:
the replica's acknowledgement costs a loopback round trip; across hosts add their round
trip), and for each round, each mode on a flushed database: ``--batches`` calls of
``enqueue_many`` with ``--batch`` new links each, then ``--singles`` calls of
``enqueue_cancel``. It prints each mode's median and 99th-percentile call time; the
summary compares medians. No worker runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.settings import Settings  # noqa: E402
from tasks import enqueue_cancel, enqueue_many  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from worker import create_app  # noqa: E402


def timed(calls) -> list[float]:
    out = []
    for call in calls:
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


def run(master: RedisServer, wait: int, args, round_: int) -> dict[str, list[float]]:
    redis.Redis.from_url(master.url).flushdb()
    app = create_app(Settings.from_env({"REDIS_URL": master.url, "REDIS_WAIT_REPLICAS": str(wait)}))
    tag = f"r{round_}w{wait}"
    batches = [[f"pl-{tag}-b{b}-{i}" for i in range(args.batch)] for b in range(args.batches)]
    many = timed(lambda links=links: enqueue_many(links, app=app) for links in batches)
    singles = timed(lambda n=n: enqueue_cancel(f"pl-{tag}-s{n}", app=app) for n in range(args.singles))
    app.close()
    return {"many": many, "single": singles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--singles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    master = RedisServer(prefix="pc-bench-wait-master-")
    replica = RedisServer(prefix="pc-bench-wait-replica-", args=("--replicaof", "127.0.0.1", str(master.port)))
    try:
        while redis.Redis(port=replica.port).info("replication")["master_link_status"] != "up":
            time.sleep(0.1)
        medians = {(kind, wait): [] for kind in ("many", "single") for wait in (0, 1)}
        for round_ in range(1, args.rounds + 1):
            for wait in (0, 1):
                result = run(master, wait, args, round_)
                for kind, values in result.items():
                    medians[kind, wait].append(statistics.median(values))
                    print(f"round {round_} WAIT {'1' if wait else 'off'} {kind:6s}: median "
                          f"{statistics.median(values) * 1000:.3f} ms, p99 {p99(values) * 1000:.3f} ms "
                          f"({len(values)} calls)", flush=True)
        for kind, label in (("many", f"enqueue_many({args.batch})"), ("single", "enqueue_cancel")):
            off, on = statistics.median(medians[kind, 0]), statistics.median(medians[kind, 1])
            print(f"{label}: {off * 1000:.3f} ms without WAIT, {on * 1000:.3f} ms with WAIT 1 "
                  f"(+{(on - off) * 1000:.3f} ms a call, x{on / off:.2f})")
    finally:
        replica.stop()
        master.stop()


if __name__ == "__main__":
    main()
