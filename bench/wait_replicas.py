"""What ``REDIS_WAIT_REPLICAS`` costs a producer: ``enqueue_many`` and ``enqueue_cancel``
with it off (the baseline), at ``auto`` (the default) and at 1 with a replica, and at
``auto`` on a master with none (its count and ``ROLE``), same run.

Run from the repository root::

    .venv/bin/python bench/wait_replicas.py [--batches 200] [--batch 100] [--singles 2000] [--rounds 3]

It starts a master and one replica, and a master alone (``redis-server``, no persistence,
all on this host: the replica's acknowledgement costs a loopback round trip; across
hosts add their round trip), and for each round, each mode on a flushed database: ``--batches`` calls of
``enqueue_many`` with ``--batch`` new links each, then ``--singles`` calls of
``enqueue_cancel``. It prints each mode's median and 99th-percentile call time; the
summary compares medians. No worker runs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plural_cancel.config.settings import Settings  # noqa: E402
from plural_cancel.tasks import enqueue_cancel, enqueue_many  # noqa: E402
from plural_cancel.worker import create_app  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402


def timed(calls) -> list[float]:
    out = []
    for call in calls:
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


MODES = (("off", "0", True), ("auto", "auto", True), ("1", "1", True), ("auto, no replica", "auto", False))
"""(label, REDIS_WAIT_REPLICAS, whether the master has its replica): ``off`` is the baseline."""


def run(server: RedisServer, wait: str, args, round_: int) -> dict[str, list[float]]:
    redis.Redis.from_url(server.url).flushdb()
    app = create_app(Settings.from_env({"REDIS_URL": server.url, "REDIS_WAIT_REPLICAS": wait}))
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
    quick = ("--repl-diskless-sync-delay", "0")
    master = RedisServer(prefix="pc-bench-wait-master-", args=quick)
    replica = RedisServer(prefix="pc-bench-wait-replica-", args=("--replicaof", "127.0.0.1", str(master.port)))
    alone = RedisServer(prefix="pc-bench-wait-alone-")
    logging.getLogger("plural_cancel.worker.replication").setLevel(logging.ERROR)  # its once-a-minute warning
    try:
        while not redis.Redis(port=master.port).execute_command("ROLE")[2]:
            time.sleep(0.1)
        medians = {(kind, label): [] for kind in ("many", "single") for label, _, _ in MODES}
        for round_ in range(1, args.rounds + 1):
            for label, wait, replicated in MODES:
                result = run(master if replicated else alone, wait, args, round_)
                for kind, values in result.items():
                    medians[kind, label].append(statistics.median(values))
                    print(f"round {round_} {label:16s} {kind:6s}: median {statistics.median(values) * 1000:.3f} ms, "
                          f"p99 {p99(values) * 1000:.3f} ms ({len(values)} calls)", flush=True)
        for kind, name in (("many", f"enqueue_many({args.batch})"), ("single", "enqueue_cancel")):
            off = statistics.median(medians[kind, "off"])
            print(f"{name}: {off * 1000:.3f} ms with REDIS_WAIT_REPLICAS=0")
            for label, _, _ in MODES[1:]:
                on = statistics.median(medians[kind, label])
                print(f"  {label:16s} {on * 1000:.3f} ms (+{(on - off) * 1000:.3f} ms a call, x{on / off:.2f})")
    finally:
        alone.stop()
        replica.stop()
        master.stop()


if __name__ == "__main__":
    main()
