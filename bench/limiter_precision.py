"""Limiter precision: our shared Redis limiter against Celery's own ``rate_limit``, same run.

Run from the repository root::

    .venv/bin/python bench/limiter_precision.py [--tasks 600] [--workers 3] [--threads 8]

It starts its own ``redis-server`` on a free port and ``--workers`` Celery worker
processes running this module's app (``--pool threads``), and drains ``--tasks`` tasks
three times, with a limit of 20 per second:

(b) a bare task that first calls our :class:`worker.ratelimit.RedisRateLimiter`
    (``reserve(max_wait=1)``, then sleep), shared by all workers through Redis;
(a) the same bare task with Celery's ``rate_limit="20/s"`` instead, on the same
    workers (``-c --threads``); Celery enforces it per worker process;
(a') (a) again on fresh workers with one thread and one prefetched message each,
    the set-up in which Celery's per-worker limit keeps pace.

Each task appends ``time.time()`` to a Redis list (all processes share one host and
one clock). For each run it prints the largest number of tasks in any 1-second
sliding window and the mean rate over the drain, both divided by the limit, and the
tasks done in each of the first ten seconds. A Celery run that has not drained after
``--celery-seconds`` is measured on what ran.

The Celery app lives here, not in ``worker/``: the bench measures the limiter, not the
product's task.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plural_cancel.worker.ratelimit import RedisRateLimiter, acquire  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.timing import largest_window  # noqa: E402

LIMIT = 20
"""Calls per second; fixed, because the task decorator needs it when the workers import this."""
LIMITER_KEY = "bench:ratelimit"
QUEUE = "bench-limiter"

# The broker URL comes from the command line (`celery -b URL`), which Celery puts in
# CELERY_BROKER_URL before importing this module.
app = Celery("limiter_precision")
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)
_clients: dict[str, redis.Redis] = {}


def _redis() -> redis.Redis:
    url = app.conf.broker_url
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


@app.task(name="bench.celery_limited", rate_limit=f"{LIMIT}/s")
def celery_limited(log: str) -> None:
    _redis().rpush(log, repr(time.time()))


@app.task(name="bench.our_limited")
def our_limited(log: str, limit: float) -> None:
    limiter = RedisRateLimiter(_redis(), LIMITER_KEY, rate=limit, burst=0)
    while not acquire(limiter, max_wait=1.0).granted:
        # The product defers the cancel here; for the bench a short nap does the same job.
        time.sleep(0.2)
    _redis().rpush(log, repr(time.time()))


# -- the driver ----------------------------------------------------------------------


def _drain(client: redis.Redis, task, args: tuple, name: str, n: int, timeout: float) -> list[float]:
    """Enqueue ``n`` tasks; return the times of those that ran within ``timeout`` seconds."""
    log = f"bench:times:{name}"
    client.delete(log)
    for _ in range(n):
        task.apply_async(args=(log, *args))
    deadline = time.monotonic() + timeout
    while client.llen(log) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return [float(t) for t in client.lrange(log, 0, -1)]


def _report(label: str, times: list[float], limit: float, enqueued: int) -> int:
    window = largest_window(times)
    mean = (len(times) - 1) / (max(times) - min(times)) if len(times) > 1 else 0.0
    print(f"{label:18}  ran {len(times):4d}/{enqueued}  largest 1-s window {window:3d} = {window / limit:.2f} x limit"
          f"   mean rate {mean:6.2f}/s = {mean / limit:.3f} x limit")
    if times:
        first = min(times)
        bins = [0] * 10
        for t in times:
            if t - first < len(bins):
                bins[int(t - first)] += 1
        print(f"{'':18}  tasks in each of the first 10 seconds: {' '.join(map(str, bins))}")
    return window


def _start_workers(url: str, n: int, *options: str) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.limiter_precision", "-b", url, "worker",
         "--pool", "threads", *options, "-n", f"bench{i}@%h", "-Q", QUEUE,
         "--without-gossip", "--without-mingle", "-l", "error"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
    deadline = time.monotonic() + 60
    while len(app.control.ping(timeout=0.5) or []) < n:
        if time.monotonic() > deadline:
            _stop(workers)
            raise SystemExit("the Celery workers did not answer a ping within 60 s")
    return workers


def _stop(workers: list[subprocess.Popen]) -> None:
    for proc in workers:
        proc.terminate()
    for proc in workers:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--celery-seconds", type=float, default=30.0,
                        help="stop waiting for Celery's rate-limited tasks after this long")
    args = parser.parse_args()
    limit = LIMIT

    redis_server = RedisServer(prefix="bench-redis-")
    url = redis_server.url
    workers: list[subprocess.Popen] = []
    try:
        client = redis.Redis.from_url(url)
        app.conf.broker_url = url
        print(f"limit {limit}/s, {args.tasks} tasks, {args.workers} Celery worker processes")

        # (b) and (a) on the same workers, --threads each. Ours first: Celery's rate-limited
        # messages that have not run by the cut-off stay in the workers' buckets and would
        # otherwise compete with the other run.
        workers = _start_workers(url, args.workers, "-c", str(args.threads))
        ours = _drain(client, our_limited, (limit,), "ours", args.tasks, 3 * args.tasks / limit + 30)
        celery = _drain(client, celery_limited, (), "celery", args.tasks, args.celery_seconds)
        _stop(workers)
        app.control.purge()  # what the stopped workers handed back

        # (a') Celery's rate_limit where it keeps pace: one thread and one prefetched message a worker.
        workers = _start_workers(url, args.workers, "-c", "1", "--prefetch-multiplier", "1")
        celery_one = _drain(client, celery_limited, (), "celery-c1", args.tasks, args.celery_seconds)

        print(f"-- {args.threads} threads a worker")
        celery_window = _report("Celery rate_limit", celery, limit, args.tasks)
        our_window = _report("RedisRateLimiter", ours, limit, args.tasks)
        print("-- 1 thread a worker, prefetch 1")
        celery_one_window = _report("Celery rate_limit", celery_one, limit, args.tasks)
        print(f"largest-window ratio Celery / ours: {celery_window / our_window:.2f} ({args.threads} threads), "
              f"{celery_one_window / our_window:.2f} (1 thread)")
        return 0 if len(ours) == args.tasks else 1
    finally:
        _stop(workers)
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
