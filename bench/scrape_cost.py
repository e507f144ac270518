"""What reading the oldest live cancel costs a metrics scrape, at a thousand live cancels and at
a million, against a PING and the rest of the scrape in the same run.

Usage::

    .venv/bin/python bench/scrape_cost.py [--count 1000000] [--calls 300]

On a fresh ``redis-server`` (no persistence), ``--count`` live cancels of the default account
are created through the ledger (``Ledger.create_many``, no worker running): half held in the
backlog (a bulk enqueue), half due at once (in the due index and the live index). The read is
measured at 1,000 live cancels and again at ``--count``:

- ``oldest_live``: ``Ledger.oldest_live``, the one script call behind
  ``plural_cancel_oldest_live_seconds``: client round trip (median of ``--calls``) and Redis's
  own time per call (``INFO commandstats``, ``evalsha``'s ``usec_per_call``);
- ``snapshot``: ``worker.metrics.snapshot``, everything a scrape reads from Redis, it included;
- ``ping``: a ``PING``'s round trip, the floor of any read.

Prints each figure, the ratio of the read at ``--count`` to the read at 1,000, and its share of
the scrape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import use_settings  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

CHUNK = 10_000


def median_ms(call, calls: int) -> float:
    """Median wall time of ``call()`` over ``calls`` calls, in milliseconds."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def server_usec(redis, call, calls: int) -> float:
    """Redis's own microseconds per ``EVALSHA`` over ``calls`` calls of ``call()``."""
    redis.config_resetstat()
    for _ in range(calls):
        call()
    return float(redis.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def fill(ledger, start: int, stop: int) -> None:
    """Live cancels ``start`` to ``stop``: the even chunks held in the backlog, the odd ones due
    (half and half, in chunks of at most ``CHUNK``)."""
    chunk = min(CHUNK, (stop - start) // 2)
    for n, first in enumerate(range(start, stop, chunk)):
        pairs = [(f"bench-{i:09d}", f"pl_{i:012d}") for i in range(first, min(first + chunk, stop))]
        ledger.create_many(pairs, hold=n % 2 == 0)


def measure(app, calls: int) -> dict:
    from plural_cancel.worker import metrics

    ledger, redis = app.runtime.ledger, app.runtime.redis
    read = lambda: ledger.oldest_live(["default"])  # noqa: E731
    assert read()["default"] is not None
    return {"live": sum(int(v) for k, v in redis.hgetall(app.runtime.keys.stats).items() if k == b"queued"),
            "backlog": redis.llen(app.runtime.keys.backlog), "index": redis.zcard(app.runtime.keys.live),
            "ping": median_ms(redis.ping, calls), "oldest_live": median_ms(read, calls),
            "oldest_live_server_us": server_usec(redis, read, calls),
            "snapshot": median_ms(lambda: metrics.snapshot(app.runtime), max(10, calls // 10))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="live cancels in the large case")
    parser.add_argument("--calls", type=int, default=300, help="reads timed in each case")
    args = parser.parse_args(argv)
    server = RedisServer(prefix="bench-scrape-")
    try:
        app = use_settings(server.url)
        rows = []
        fill(app.runtime.ledger, 0, 1000)
        rows.append(measure(app, args.calls))
        started = time.perf_counter()
        fill(app.runtime.ledger, 1000, args.count)
        print(f"created {args.count - 1000:,} more live cancels in {time.perf_counter() - started:.1f} s")
        rows.append(measure(app, args.calls))
    finally:
        server.stop()
    print(f"{'live':>10}{'backlog':>10}{'index':>10}{'ping ms':>9}{'oldest_live ms':>16}{'Redis µs':>10}"
          f"{'snapshot ms':>13}{'share':>7}")
    for r in rows:
        print(f"{r['live']:>10,}{r['backlog']:>10,}{r['index']:>10,}{r['ping']:>9.3f}{r['oldest_live']:>16.3f}"
              f"{r['oldest_live_server_us']:>10.1f}{r['snapshot']:>13.2f}{r['oldest_live'] / r['snapshot']:>7.2f}")
    small, large = rows
    print(f"oldest_live at {large['live']:,} / at {small['live']:,}: round trip "
          f"{large['oldest_live'] / small['oldest_live']:.2f}, Redis time "
          f"{large['oldest_live_server_us'] / small['oldest_live_server_us']:.2f}; "
          f"/ ping at {large['live']:,}: {large['oldest_live'] / large['ping']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
