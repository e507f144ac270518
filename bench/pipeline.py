"""End-to-end cancels per second: the product's worker against a bare Celery task, same run.

Run from the repository root (about 12 minutes as docs/benchmarks.md runs it)::

    .venv/bin/python bench/pipeline.py [--count0 3000] [--count200 3000] [--rounds 1]
        [--modes product,bare[,sleep][,events]] [--latencies 0,200] [--pool-count 2000]
        [--prefork-count 200] [--two-processes] [--no-pools] [--commandstats]
        [--py-spy DIR] [--loglevel INFO] [--switch-interval S] [--concurrency 128] [--warmup 500]

It starts its own ``redis-server`` on a free port and the Plural sandbox
(``python -m sandbox --port 0 --no-demo-links``), then, at 0 ms and at 200 ms of added
sandbox latency (``PUT /_admin/faults``):

(a) **product**: one ``celery -A worker worker -c 128`` process (its default pool, Celery's
    threads pool as ``worker.pool`` extends it) with the
    product's settings (``PLURAL_RATE_LIMIT=10000`` so that the limiter is never the
    bottleneck; breaker and everything else at their defaults; ``--loglevel=INFO`` as in
    the Procfile). ``N`` fresh CREATED links; ``tasks.enqueue_many`` enqueues ``N``
    cancels; the clock runs from the first enqueue until every ledger record is
    terminal (the records' ``state`` polled with a pipeline every 0.2 s; the finish time
    is the latest record's ``updated_at``). ``ok`` counts ``succeeded/cancelled`` records.
(b) **bare** (``bench/bare_app.py``): one ``celery -A bench.bare_app worker`` with the same
    pool, concurrency, log level, late acks and prefetch 1, whose task makes only the same
    ``PUT`` (the same headers, a bearer token fetched once by this driver) through one
    ``requests.Session``, as the product's client does, and counts itself done in Redis.
    ``N`` fresh links, enqueued with ``apply_async`` in a loop inside kombu's ``Producer.batch`` (pipelined like
    ``enqueue_many``, so the driver's enqueue pace does not hold the bare worker back);
    the clock runs from the first enqueue to the last task's finish.
(c) **sleep** (only with ``--modes ...,sleep``): the bare worker with a task that makes no
    call and sleeps for the latency: Celery's own ceiling on this machine.
(d) **events** (only with ``--modes ...,events``): (a) with task events on (``-E``, what
    Flower needs), rated against (a) in a table of its own.

Each run compares the sandbox's count of successful cancels with ``ok``; a difference, a
run cut off unfinished and any error the worker logged are noted under its row, and the
exit status is 1 if any run left cancels unfinished. Per run it prints seconds, cancels/s,
Redis commands per cancel (``INFO commandstats``, less the driver's polls; commands inside
Lua scripts count too), worker CPU milliseconds per cancel,
and the CPU seconds of the worker, the sandbox, Redis and this driver. Per latency it prints
product/bare of the best rates, and bare/product of their worker CPU per cancel: one
process cannot use much more than one core, so that is the share of the bare task's speed
the product keeps once CPU is what limits both, and it is steadier than the rates on a
shared machine.

Unless ``--no-pools``, it then runs the product's worker at 200 ms under
its default pool, ``--pool gevent`` at the same concurrency (if gevent is installed:
``pip install -e '.[bench]'``) and ``--pool prefork -c 2`` (one process per core), and with
``--two-processes`` two threads workers side by side, and prints cancels/s for each.

``--py-spy DIR`` records each single-worker run with ``py-spy record --gil`` (collapsed
stacks of the thread holding the GIL) into DIR; ``--loglevel`` and ``--switch-interval``
(a ``sitecustomize`` on the workers' ``PYTHONPATH``) are for experiments.

All of this shares the machine: the worker, the sandbox (one asyncio process), Redis and
this driver compete for the same cores, so the 1-minute load average is printed per run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import HEADER, Run, Worker, cpu_seconds, load_average, print_run  # noqa: E402
from plural_cancel.config.celery import DEFAULT_CONCURRENCY  # noqa: E402
from plural_cancel.config.settings import Settings  # noqa: E402
from plural_cancel.worker.keys import Keys  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.sandbox import SandboxProcess, start_sandbox_process  # noqa: E402
from tests.support.workers import service_env  # noqa: E402

POLL = 0.2
"""Seconds between looks at the ledger (or the bare task's counter)."""
GRACE = 180.0
"""Seconds a run may take beyond ``N / 20``: long enough for messages re-delivered after the
visibility timeout (72 s with the product's defaults) to finish. A run that has not finished
by then is cut off and measured on what finished."""
POLL_FIRST = 16
"""Records read in a poll's first round trip; the chunk doubles while every record read is done."""
TERMINAL = {b"succeeded", b"failed"}


class Bench:
    """The runs of one invocation: one Redis, one sandbox, a fresh database and links for each run."""

    def __init__(self, redis_url: str, redis_pid: int, sandbox: SandboxProcess, *,
                 profile_dir: Path | None = None, loglevel: str = "INFO",
                 switch_interval: float | None = None):
        self.loglevel = loglevel
        self.site_dir: Path | None = None
        if switch_interval is not None:
            # An experiment that leaves the product's code alone: a sitecustomize on the
            # workers' PYTHONPATH sets the interpreter's GIL switch interval (default 5 ms).
            self.site_dir = Path(tempfile.mkdtemp(prefix="bench-site-"))
            (self.site_dir / "sitecustomize.py").write_text(
                f"import sys\nsys.setswitchinterval({switch_interval!r})\n")
        self.profile_dir = profile_dir
        self.redis_url = redis_url
        self.redis_pid = redis_pid
        self.sandbox = sandbox
        self.client = redis.Redis.from_url(redis_url)
        self.token = requests.post(sandbox.url + "/auth/v1/token", timeout=10, json={
            "client_id": "test-client", "client_secret": "test-secret-do-not-leak",
            "grant_type": "client_credentials"}).json()["access_token"]
        self.keys = Keys()
        self._links = 0
        self._notes: list[str] = []
        # The producer side, once, an app of its own for this bench's Redis.
        from plural_cancel.worker import create_app
        self.app = create_app(Settings.from_env({"REDIS_URL": redis_url, "PLURAL_BASE_URL": sandbox.url,
                                                 "PLURAL_RATE_LIMIT": "10000"}))

    def close(self) -> None:
        self.client.close()
        if self.site_dir is not None:
            shutil.rmtree(self.site_dir, ignore_errors=True)

    def _site(self, env: dict[str, str]) -> dict[str, str]:
        if self.site_dir is not None:
            paths = (str(self.site_dir), env.get("PYTHONPATH"))
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def _fresh(self, n: int, latency_ms: float) -> list[str]:
        """An empty Redis, the sandbox at ``latency_ms``, and ``n`` new CREATED links."""
        self.client.flushall()
        self.sandbox.set_faults(latency_ms=latency_ms)
        self.sandbox.clear_requests()
        self._links += 1
        return self.sandbox.create_links(n, prefix=f"pl-bench{self._links:03d}-")

    def _measure(self, workers: list[Worker], run, **labels) -> Run:
        """Run ``run()`` (enqueue, wait; returns enqueue seconds, seconds, ok) with CPU accounting."""
        cancels_before = self.sandbox.stats()["cancel_count"]
        load = load_average()
        pids = {"sandbox": self.sandbox.proc.pid, "redis": self.redis_pid}
        pids.update({f"worker{i}": w.proc.pid for i, w in enumerate(workers)})
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        driver_before = sum(os.times()[:2])
        self.client.config_resetstat()
        self._notes = []
        spy = None
        if self.profile_dir is not None and len(workers) == 1:
            # --gil samples the thread that holds the GIL: where the worker's Python time
            # goes. --nonblocking: the worker is never paused.
            name = f"{labels['mode']}-{labels['pool']}-{labels['latency_ms']:.0f}ms.txt"
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
                                    "--gil", "--subprocesses", "--format", "raw", "--rate", "200",
                                    "-o", str(self.profile_dir / name), "--pid", str(workers[0].proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the first message
        enqueue_s, seconds, ok = run()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        cpu["worker"] = sum(v for k, v in cpu.items() if k.startswith("worker"))
        cpu["driver"] = sum(os.times()[:2]) - driver_before
        stats = self.client.info("commandstats")
        for w in workers:
            errors = w.errors()
            w.stop()
            if errors:
                self._notes.append(f"worker logged {len(errors)} errors; the first: {errors[0][:300]}")
        counted = self.sandbox.stats()["cancel_count"] - cancels_before
        if counted != ok and labels["mode"] != "sleep":
            self._notes.append(f"the sandbox counted {counted} successful cancels; the run counted {ok}")
        # Commands this run sent to Redis, less the driver's own reads (polls, final check,
        # the stats call): what the enqueue, the worker and its broker traffic cost.
        calls = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
        for driver_only in ("hget", "hmget", "mget", "get", "info", "config|resetstat"):
            calls.pop(driver_only, None)
        return Run(enqueue_s=enqueue_s, seconds=seconds, ok=ok, cpu=cpu, load=load, redis_calls=calls,
                   notes=self._notes, **labels)

    # -- (a) the product ---------------------------------------------------------------

    def product(self, n: int, latency_ms: float, pool: str = "threads", concurrency: int = DEFAULT_CONCURRENCY,
                processes: int = 1, *, events: bool = False) -> Run:
        from plural_cancel.tasks import enqueue_many

        app = self.app
        ids = self._fresh(n, latency_ms)
        env = self._site(service_env(self.redis_url, self.sandbox.url, PLURAL_RATE_LIMIT=10000))
        # "threads" is the product's default pool (no --pool): Celery's threads pool that can
        # hand its cancels back on shutdown (worker.pool), the same at work.
        workers = [Worker("worker", env, None if pool == "threads" else pool, concurrency, [], self.loglevel, app,
                          options=("-E",) if events else ())
                   for _ in range(processes)]
        mode = "product" if processes == 1 else f"product×{processes}"

        def run():
            t0 = time.time()
            request_ids = enqueue_many(ids, app=app)
            enqueue_s = time.time() - t0
            self._wait_ledger(request_ids, timeout=GRACE + n / 20)
            finished, ok = self._finish_time(request_ids)
            return enqueue_s, finished - t0, ok

        return self._measure(workers, run, mode=f"{mode}-E" if events else mode,
                             pool=pool, concurrency=concurrency, latency_ms=latency_ms, n=n)

    def events(self, n: int, latency_ms: float, pool: str = "threads", concurrency: int = DEFAULT_CONCURRENCY) -> Run:
        """The product's worker with task events on (``-E``, what Flower needs), otherwise the same."""
        return self.product(n, latency_ms, pool, concurrency, events=True)

    def _wait_ledger(self, request_ids: list[str], timeout: float) -> None:
        """Until every record's ``state`` is terminal; reads pending records in order, a chunk at a time."""
        pending = [self.keys.record(r) for r in request_ids]
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                self._notes.append(f"cut off: {len(pending)} of {len(request_ids)} cancels not terminal "
                                   f"after {timeout:.0f} s")
                return
            time.sleep(POLL)
            size = POLL_FIRST
            while pending:
                chunk = pending[:size]
                pipe = self.client.pipeline(transaction=False)
                for key in chunk:
                    pipe.hget(key, "state")
                left = [key for key, state in zip(chunk, pipe.execute()) if state not in TERMINAL]
                pending[:size] = left
                if left:  # cancels run roughly in order: the ones after these are not done either
                    break
                size *= 2  # the whole chunk was done and dropped: read further, more at a time

    def _finish_time(self, request_ids: list[str]) -> tuple[float, int]:
        """(epoch of the latest ``updated_at``, how many ``succeeded`` with ``cancelled``)."""
        latest, ok = 0.0, 0
        for start in range(0, len(request_ids), 1000):
            pipe = self.client.pipeline(transaction=False)
            for r in request_ids[start:start + 1000]:
                pipe.hmget(self.keys.record(r), "state", "outcome", "updated_at")
            for state, outcome, updated in pipe.execute():
                if state in TERMINAL:
                    ok += state == b"succeeded" and outcome == b"cancelled"
                    latest = max(latest, _epoch(updated.decode()))
        return latest, ok

    # -- (b) the bare task --------------------------------------------------------------

    def sleep(self, n: int, latency_ms: float, pool: str = "threads", concurrency: int = DEFAULT_CONCURRENCY) -> Run:
        """The bare worker with a task that sleeps ``latency_ms`` instead of calling the sandbox."""
        return self.bare(n, latency_ms, pool, concurrency, sleep=True)

    def bare(self, n: int, latency_ms: float, pool: str = "threads", concurrency: int = DEFAULT_CONCURRENCY, *,
             sleep: bool = False) -> Run:
        from bench import bare_app

        ids = self._fresh(n, latency_ms)
        env = self._site({**os.environ, "PYTHONPATH": str(ROOT), "BENCH_PLURAL_URL": self.sandbox.url,
                          "BENCH_PLURAL_TOKEN": self.token, "PYTHONUNBUFFERED": "1"})
        bare_app.app.conf.broker_url = self.redis_url
        worker = Worker("bench.bare_app", env, pool, concurrency, ["-b", self.redis_url], self.loglevel,
                        bare_app.app)

        def run():
            # apply_async builds each message; kombu's Producer.batch pipelines the LPUSHes,
            # 1,000 a round trip, as enqueue_many does, so that the driver's enqueue pace
            # is not what limits the bare worker.
            with bare_app.app.connection_for_write() as conn:
                producer = bare_app.app.amqp.Producer(conn)
                t0 = time.time()
                with producer.batch(max_size=1000):
                    for link_id in ids:
                        kwargs = {"payment_link_id": link_id, "request_id": str(uuid.uuid4())}
                        if sleep:
                            kwargs["seconds"] = latency_ms / 1000
                        task = bare_app.bare_sleep if sleep else bare_app.bare_cancel
                        task.apply_async(kwargs=kwargs, producer=producer, retry=False)
                enqueue_s = time.time() - t0
            timeout = GRACE + n / 20
            deadline = time.monotonic() + timeout
            while True:
                done, bad = (int(v or 0) for v in self.client.mget(bare_app.DONE_KEY, bare_app.BAD_KEY))
                if done + bad >= n:
                    break
                if time.monotonic() > deadline:
                    self._notes.append(f"cut off: {n - done - bad} of {n} bare tasks not done after "
                                       f"{timeout:.0f} s")
                    break
                time.sleep(POLL)
            return enqueue_s, float(self.client.get("bench:bare:last")) - t0, done

        return self._measure([worker], run, mode="sleep" if sleep else "bare", pool=pool, concurrency=concurrency,
                             latency_ms=latency_ms, n=n)


def _epoch(value: str) -> float:
    """A record's ``updated_at`` (stored as epoch seconds; ISO 8601 accepted too) in epoch seconds."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count0", type=int, default=3000, help="cancels per run at 0 ms")
    parser.add_argument("--count200", type=int, default=3000, help="cancels per run at 200 ms")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--warmup", type=int, default=500,
                        help="cancels per mode run once, unmeasured, before the first measured run (0: none)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="product/bare pairs per latency (order alternates); the best of each counts")
    parser.add_argument("--pool-count", type=int, default=2000, help="cancels per threads/gevent run")
    parser.add_argument("--prefork-count", type=int, default=200, help="cancels in the prefork -c 2 run")
    parser.add_argument("--no-pools", action="store_true", help="skip the pool comparison")
    parser.add_argument("--two-processes", action="store_true",
                        help="also run two threads workers at 200 ms: one per core")
    parser.add_argument("--latencies", default="0,200", help="comma-separated sandbox latencies, ms")
    parser.add_argument("--modes", default="product,bare",
                        help="comma-separated: product, bare, sleep (the bare worker, no HTTP: Celery's ceiling), "
                             "events (the product's worker with task events on, -E)")
    parser.add_argument("--loglevel", default="INFO", help="the workers' --loglevel (the Procfile's is INFO)")
    parser.add_argument("--switch-interval", type=float, metavar="SECONDS",
                        help="experiment: the workers' sys.setswitchinterval (Python's default is 0.005)")
    parser.add_argument("--commandstats", action="store_true",
                        help="after each run, print the Redis commands it sent, per cancel")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record each worker with py-spy (collapsed stacks) into DIR")
    args = parser.parse_args(argv)

    server = RedisServer(prefix="bench-redis-")
    url = server.url
    sandbox = bench = None
    failures = 0
    try:
        sandbox = start_sandbox_process(extra_args=["--no-demo-links"])
        if args.py_spy is not None:
            args.py_spy.mkdir(parents=True, exist_ok=True)
        bench = Bench(url, server.pid, sandbox, profile_dir=args.py_spy, loglevel=args.loglevel,
                      switch_interval=args.switch_interval)
        print(f"{os.cpu_count()} CPUs; redis-server pid {server.pid}; sandbox {sandbox.url}; "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(HEADER, flush=True)
        # The first run of a fresh machine state was 20-30 % slower than the rest in every
        # invocation, whichever mode it was: each mode runs once unmeasured first.
        for mode in (m.strip() for m in args.modes.split(",") if m.strip() and args.warmup > 0):
            getattr(bench, mode)(args.warmup, 0.0, concurrency=args.concurrency)
        results: dict[float, dict[str, Run]] = {}
        cheapest: dict[float, dict[str, float]] = {}
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for latency in (float(x) for x in args.latencies.split(",")):
            n = args.count0 if latency == 0 else args.count200
            best: dict[str, Run] = {}
            cpu: dict[str, float] = {}
            for round_ in range(args.rounds):
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    r = getattr(bench, mode)(n, latency, concurrency=args.concurrency)
                    print_run(r, args.commandstats)
                    failures += r.ok != r.n
                    if mode not in best or r.rate > best[mode].rate:
                        best[mode] = r
                    cpu[mode] = min(cpu.get(mode, float("inf")), r.worker_ms)
            results[latency], cheapest[latency] = best, cpu

        print()
        print("best rate and lowest worker CPU per cancel of each mode:")
        print(f"{'latency':>8}{'product/s':>11}{'bare/s':>9}{'product/bare':>14}"
              f"{'CPU ms/N product':>18}{'bare':>6}{'bare/product':>14}   aim")
        for latency, best in results.items():
            if "product" not in best or "bare" not in best:
                continue
            p, b = best["product"].rate, best["bare"].rate
            aim = "0.6 of bare or better" if latency == 0 else "200 cancels/s or more"
            met = (p / b >= 0.6) if latency == 0 else (p >= 200)
            pc, bc = cheapest[latency]["product"], cheapest[latency]["bare"]
            print(f"{latency:>6.0f}ms{p:>11.1f}{b:>9.1f}{p / b:>14.2f}{pc:>18.2f}{bc:>6.2f}{bc / pc:>14.2f}"
                  f"   {aim}: {'met' if met else 'NOT met'}")

        if any("events" in best and "product" in best for best in results.values()):
            print()
            print("task events (-E) against the same worker without them:")
            print(f"{'latency':>8}{'product/s':>11}{'-E/s':>7}{'-E/product':>12}"
                  f"{'CPU ms/N product':>18}{'-E':>6}{'-E/product':>12}")
            for latency, best in results.items():
                if "events" in best and "product" in best:
                    p, e = best["product"].rate, best["events"].rate
                    pc, ec = cheapest[latency]["product"], cheapest[latency]["events"]
                    print(f"{latency:>6.0f}ms{p:>11.1f}{e:>7.1f}{e / p:>12.2f}{pc:>18.2f}{ec:>6.2f}{ec / pc:>12.2f}")

        if not args.no_pools:
            print()
            print("pools, product worker, 200 ms latency")
            print(HEADER, flush=True)
            pools: list[tuple] = [("threads", DEFAULT_CONCURRENCY, args.pool_count)]
            if importlib.util.find_spec("gevent") is not None:
                pools.append(("gevent", DEFAULT_CONCURRENCY, args.pool_count))
            else:
                print("(gevent is not installed: pip install -e '.[bench]' to include it)")
            pools.append(("prefork", 2, args.prefork_count))
            if args.two_processes:
                pools.append(("threads", DEFAULT_CONCURRENCY, args.pool_count, 2))
            for pool, concurrency, n, *processes in pools:
                r = bench.product(n, 200, pool=pool, concurrency=concurrency,
                                  processes=(processes or [1])[0])
                print_run(r, args.commandstats)
                failures += r.ok != r.n
        if failures:
            print(f"{failures} run(s) had cancels that did not end succeeded/cancelled (column ok)")
        return 1 if failures else 0
    finally:
        if bench is not None:
            bench.close()
        if sandbox is not None:
            sandbox.stop()
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
