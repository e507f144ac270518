"""A million-link backlog: what a bulk enqueue costs Redis and how fast the workers drain it,
held in the ledger (the product) against a Celery message per link (the design before it).

Usage::

    .venv/bin/python bench/backlog.py [--count 1000000] [--drain 6000] [--rate 100] [--workers 2]

Two parts, each run for both designs in the same run, each design on a fresh
``redis-server`` (no persistence: ``used_memory`` is the same with AOF on):

- **Enqueue** ``--count`` links (no worker running), ``enqueue_many`` in chunks of
  ``--chunk`` links (``plural-cancel bulk`` sends 1,000 a call). *held*: the product
  (``tasks.producer.enqueue_many``: a compact ledger record per link, two seconds'
  worth of messages). *messages*: the same records, and every cancel's Celery message
  published at once (``tasks.producer.submit`` without ``hold``: how ``enqueue_many``
  worked before). Prints enqueue time, enqueues/s, Redis ``used_memory`` before, at
  peak and per pending cancel.
- **Drain** ``--drain`` links from the sandbox with ``--workers`` worker processes at
  ``PLURAL_RATE_LIMIT=--rate``: enqueued at once, then timed from the first cancel's end
  to the last's (Redis's clock, each record's ``updated_at``). Prints the drain rate and
  its ratio to the limit (the limiter grants 0.97 of it: ``worker.runtime.PACING``), the
  outcomes (``gave_up`` would be a cancel that gave up for waiting in line), and
  ``used_memory`` after, per ended cancel (records kept ``RESULT_TTL``, outcome stream).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import use_settings  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.sandbox import start_sandbox_process  # noqa: E402
from tests.support.workers import service_env, start_worker  # noqa: E402

DESIGNS = ("held", "messages")


def enqueue(app, design: str, links: list[str], chunk_size: int = 10_000) -> list[str]:
    """Enqueue ``links`` the way ``design`` does; returns their Request-IDs."""
    from plural_cancel.tasks.producer import enqueue_many, new_request_ids, submit

    ids: list[str] = []
    for start in range(0, len(links), chunk_size):
        chunk = links[start:start + chunk_size]
        if design == "held":
            ids += enqueue_many(chunk, app=app)
        else:  # a record and a Celery message per link, published at once
            pairs = list(zip(new_request_ids(len(chunk)), chunk))
            submit(app, pairs)
            ids += [rid for rid, _ in pairs]
    return ids


def used_memory(app) -> tuple[int, int]:
    info = app.runtime.redis.info("memory")
    return info["used_memory"], info["used_memory_peak"]


def enqueue_part(design: str, count: int, chunk_size: int) -> dict:
    server = RedisServer(prefix="bench-backlog-")
    try:
        app = use_settings(server.url, PLURAL_RATE_LIMIT="10")
        links = [f"pl_{n:012d}" for n in range(count)]
        before, _ = used_memory(app)
        started = time.perf_counter()
        enqueue(app, design, links, chunk_size)
        seconds = time.perf_counter() - started
        after, peak = used_memory(app)
        redis = app.runtime.redis
        return {"design": design, "count": count, "seconds": seconds, "before": before, "after": after,
                "peak": peak, "queue": redis.llen(app.settings.cancel_queue),
                "backlog": redis.llen(app.runtime.keys.backlog)}
    finally:
        server.stop()


def drain_part(design: str, count: int, rate: float, workers: int) -> dict:
    server = RedisServer(prefix="bench-drain-")
    sandbox = start_sandbox_process(client_id="test-client", client_secret="test-secret-do-not-leak",
                                    extra_args=["--no-demo-links"])
    env = service_env(server.url, sandbox.url, PLURAL_RATE_LIMIT=str(rate), RESULT_TTL="3600")
    procs = [start_worker(env, concurrency=64) for _ in range(workers)]
    try:
        app = use_settings(server.url, sandbox.url, PLURAL_RATE_LIMIT=str(rate), RESULT_TTL="3600")
        links = sandbox.create_links(count, prefix="pl-drain-")
        sandbox.clear_requests()
        before, _ = used_memory(app)
        ids = enqueue(app, design, links)
        deadline = time.monotonic() + 3 * count / rate + 60
        while True:
            statuses = app.runtime.ledger.statuses(ids)
            if all(s and s["state"] in ("succeeded", "failed") for s in statuses):
                break
            if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
                raise SystemExit(f"{design}: not drained in time")
            time.sleep(1)
        after, peak = used_memory(app)
        ends = sorted(app.runtime.redis.hget(app.runtime.keys.record(rid), "updated_at") for rid in ids)
        first, last = float(ends[0]), float(ends[-1])
        return {"design": design, "count": count, "rate": (count - 1) / (last - first), "limit": rate,
                "outcomes": Counter(s["outcome"] for s in statuses), "before": before, "after": after, "peak": peak}
    finally:
        for proc in procs:
            proc.stop()
        sandbox.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="links enqueued in the enqueue part")
    parser.add_argument("--chunk", type=int, default=10_000, help="links per enqueue_many call")
    parser.add_argument("--drain", type=int, default=6000, help="links drained in the drain part")
    parser.add_argument("--rate", type=float, default=100.0, help="PLURAL_RATE_LIMIT in the drain part (per second)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes in the drain part")
    args = parser.parse_args(argv)

    print(f"enqueue {args.count:,} links, chunks of {args.chunk:,}, no worker")
    print(f"{'design':<10}{'seconds':>9}{'enqueues/s':>12}{'before MB':>11}{'peak MB':>9}{'B/pending':>11}"
          f"{'in broker':>11}{'in backlog':>12}")
    enqueued = {}
    for design in DESIGNS:
        r = enqueued[design] = enqueue_part(design, args.count, args.chunk)
        print(f"{design:<10}{r['seconds']:>9.1f}{r['count'] / r['seconds']:>12,.0f}{r['before'] / 1e6:>11.1f}"
              f"{r['peak'] / 1e6:>9.1f}{(r['after'] - r['before']) / r['count']:>11,.0f}{r['queue']:>11,}"
              f"{r['backlog']:>12,}", flush=True)
    held, messages = enqueued["held"], enqueued["messages"]
    per = {d: (r["after"] - r["before"]) / r["count"] for d, r in enqueued.items()}
    print(f"held / messages: bytes per pending cancel {per['held'] / per['messages']:.2f}, "
          f"enqueues/s {(held['count'] / held['seconds']) / (messages['count'] / messages['seconds']):.2f}")

    print(f"\ndrain {args.drain:,} links, {args.workers} worker processes, limit {args.rate:g}/s")
    print(f"{'design':<10}{'drain/s':>9}{'÷ limit':>9}{'after MB':>10}{'peak MB':>9}{'B/ended':>9}  outcomes")
    for design in DESIGNS:
        r = drain_part(design, args.drain, args.rate, args.workers)
        print(f"{design:<10}{r['rate']:>9.1f}{r['rate'] / r['limit']:>9.3f}{r['after'] / 1e6:>10.1f}"
              f"{r['peak'] / 1e6:>9.1f}{(r['after'] - r['before']) / r['count']:>9,.0f}  {dict(r['outcomes'])}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
