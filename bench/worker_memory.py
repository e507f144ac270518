"""Worker memory over a long run: one worker process, many cancels, its RSS sampled as it goes.

Usage::

    .venv/bin/python bench/worker_memory.py [--count 100000] [--every 10000] [--rate 2000]

It starts a redis-server and the sandbox (``tests/support``), one worker process (the
product's default threads pool, ``-c 128``), then enqueues ``--every`` cancels at a time
with ``enqueue_many`` and waits for them to end before the next batch, reading the
worker's resident set (``VmRSS`` from ``/proc``) after each batch. It prints one row per
sample and the growth after the warm-up (the first batch), against the aim of the
issue: under 10 MB. ``--tracemalloc`` starts the worker with ``PYTHONTRACEMALLOC`` and
asks nothing more of it: use it with py-spy or a debugger when the growth is real.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import use_settings  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.sandbox import start_sandbox_process  # noqa: E402
from tests.support.workers import service_env, start_worker  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident set of ``pid`` in MB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def ended(app, request_ids: list[str]) -> int:
    pipe = app.runtime.redis.pipeline(transaction=False)
    for rid in request_ids:
        pipe.hget(app.runtime.keys.record(rid), "state")
    return sum(s in (b"succeeded", b"failed") for s in pipe.execute())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="cancels in all")
    parser.add_argument("--every", type=int, default=10_000, help="cancels per batch (one RSS sample each)")
    parser.add_argument("--rate", type=int, default=2000, help="PLURAL_RATE_LIMIT for the run (cancels/s)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args(argv)

    redis_server = RedisServer(prefix="bench-memory-")
    sandbox = start_sandbox_process(client_id="test-client", client_secret="test-secret-do-not-leak",
                                    extra_args=["--no-demo-links"])
    extra = {"PLURAL_RATE_LIMIT": str(args.rate), "RESULT_TTL": "3600"}
    if args.tracemalloc:
        extra["PYTHONTRACEMALLOC"] = "1"
    env = service_env(redis_server.url, sandbox.url, **extra)
    worker = start_worker(env, concurrency=args.concurrency)
    app = use_settings(redis_server.url, sandbox.url, PLURAL_RATE_LIMIT=args.rate, RESULT_TTL=3600)
    pid = worker.proc.pid
    samples: list[tuple[int, float, float]] = []
    started = time.monotonic()
    print(f"one worker process (pid {pid}), -c {args.concurrency}, limit {args.rate}/s, "
          f"{args.count:,} cancels in batches of {args.every:,}")
    print(f"{'cancels':>9}{'RSS MB':>9}{'cancels/s':>11}")
    print(f"{0:>9}{rss_mb(pid):>9.1f}{'':>11}")
    try:
        done = 0
        while done < args.count:
            n = min(args.every, args.count - done)
            links = sandbox.create_links(n, prefix=f"pl-mem-{done // args.every:03d}-")
            batch_started = time.monotonic()
            request_ids = app_enqueue(app, links)
            while ended(app, request_ids) < n:
                if worker.proc.poll() is not None:
                    raise SystemExit("the worker exited:\n" + worker.log()[-3000:])
                time.sleep(0.5)
            done += n
            rate = n / (time.monotonic() - batch_started)
            samples.append((done, rss_mb(pid), rate))
            print(f"{done:>9,}{samples[-1][1]:>9.1f}{rate:>11.0f}", flush=True)
            sandbox.clear_requests()  # the sandbox's own log is not what is measured
    finally:
        worker.stop()
        sandbox.stop()
        redis_server.stop()
    if len(samples) >= 2:
        warm, last = samples[0][1], samples[-1][1]
        peak = max(s[1] for s in samples[1:])
        print(f"after warm-up ({samples[0][0]:,} cancels): {warm:.1f} MB; at the end: {last:.1f} MB; "
              f"growth {last - warm:+.1f} MB (peak {peak - warm:+.1f} MB); aim: under 10 MB; "
              f"{time.monotonic() - started:.0f} s in all")
    return 0


def app_enqueue(app, links: list[str]) -> list[str]:
    from plural_cancel.tasks import enqueue_many

    return enqueue_many(links, app=app)


if __name__ == "__main__":
    raise SystemExit(main())
