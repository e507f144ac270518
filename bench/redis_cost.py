"""What one cancel costs Redis: commands and Redis CPU per cancel, against a bare Celery task.

Run from the repository root (about 2 minutes)::

    .venv/bin/python bench/redis_cost.py [--count 2000] [--rounds 2] [--latency-ms 0] [--idle 10] [--commandstats]

It starts its own ``redis-server`` (AOF on, ``appendfsync everysec``, as deployed) and the
sandbox, then per round, in alternating order, the runs of ``bench/pipeline.py``:

- **product**: one ``celery -A worker worker`` (threads × 128) at ``PLURAL_RATE_LIMIT=10000``;
  ``N`` cancels enqueued with ``tasks.enqueue_many``, waited for until every ledger record
  is terminal;
- **bare** (``bench/bare_app.py``): a Celery task that makes only the ``PUT`` and counts
  itself done with one ``INCR``, late acks, prefetch 1, enqueued with ``apply_async`` in
  kombu's ``Producer.batch``: what any Celery task on this Redis costs at the least.

Around each run it reads ``INFO commandstats`` and ``INFO cpu`` (``used_cpu_sys +
used_cpu_user`` of redis-server): the commands every client sent (the enqueue, the worker,
its broker traffic; those a Lua script runs count too), less the ones this driver sent to
watch the run (counted as it sends them), and the Redis CPU they took, each divided by ``N``.
Then one idle worker for ``--idle`` seconds: what a worker process costs Redis with
nothing to do (its BRPOP, the due-index pump four times a second, remote control).

It prints the figures, product ÷ bare, and the ceiling of one Redis for this product:
cancels per second at 80 % of one core (Redis runs commands on one thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import redis
from redis.client import Pipeline

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import Run, Worker  # noqa: E402
from bench.pipeline import Bench  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.sandbox import start_sandbox_process  # noqa: E402
from tests.support.workers import service_env  # noqa: E402

CORE_SHARE = 0.8
"""Share of one core a Redis may be run at before its latency climbs (the ceiling's basis)."""


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends by name, pipelined ones included: the driver's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: Counter[str] = Counter()

    def execute_command(self, *args, **options):
        self.sent[str(args[0]).lower()] += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint=None) -> Pipeline:
        sent = self.sent

        class Counted(Pipeline):
            def execute(self, raise_on_error: bool = True):
                sent.update(str(args[0]).lower() for args, _ in self.command_stack)
                if self.transaction:
                    sent.update(("multi", "exec"))
                return super().execute(raise_on_error)

        return Counted(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def totals(client: redis.Redis) -> tuple[Counter[str], float]:
    """(commands Redis has run, by name; its CPU seconds) since its start."""
    info = client.execute_command("INFO", "commandstats", "cpu")
    calls = Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items() if k.startswith("cmdstat_")})
    return calls, info["used_cpu_sys"] + info["used_cpu_user"]


class Cost(Bench):
    """pipeline.py's runs, measured for what they cost Redis."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client.close()
        self.client = CountingRedis.from_url(self.redis_url)
        self.cost: dict[str, float] = {}

    def _measure(self, workers: list[Worker], run, **labels) -> Run:
        sent0 = Counter(self.client.sent)
        calls0, cpu0 = totals(self.client)
        enqueue_s, seconds, ok = run()
        calls1, cpu1 = totals(self.client)
        driver = self.client.sent - sent0
        driver["info"] -= 1  # the INFO just sent is not in its own figures (the first one is)
        commands = calls1 - calls0 - driver
        notes = []
        for w in workers:
            errors = w.errors()
            w.stop()
            if errors:
                notes.append(f"worker logged {len(errors)} errors; the first: {errors[0][:300]}")
        self.cost = {"commands": sum(commands.values()), "driver": sum(driver.values()), "cpu": cpu1 - cpu0}
        self.by_command = commands
        return Run(enqueue_s=enqueue_s, seconds=seconds, ok=ok, cpu={}, load=os.getloadavg()[0],
                   redis_calls={}, notes=notes, **labels)

    def idle(self, seconds: float) -> dict[str, float]:
        """One product worker with nothing to do for ``seconds``: commands and CPU per second."""
        self.client.flushall()
        worker = Worker("worker", service_env(self.redis_url, self.sandbox.url), None, 128, [], "INFO", self.app)
        time.sleep(2)  # past its start-up traffic
        calls0, cpu0 = totals(self.client)
        time.sleep(seconds)
        calls1, cpu1 = totals(self.client)
        worker.stop()
        return {"commands": (sum((calls1 - calls0).values()) - 1) / seconds, "cpu": (cpu1 - cpu0) / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="cancels (tasks) per run")
    parser.add_argument("--rounds", type=int, default=2, help="product/bare pairs, order alternating")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the sandbox's added latency")
    parser.add_argument("--warmup", type=int, default=300, help="cancels per mode run once, unmeasured")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of one idle worker (0: skip)")
    parser.add_argument("--commandstats", action="store_true", help="print each run's commands per cancel, by name")
    args = parser.parse_args(argv)

    server = RedisServer(prefix="bench-redis-", aof=True)
    sandbox = bench = None
    failures = 0
    try:
        sandbox = start_sandbox_process(extra_args=["--no-demo-links"])
        bench = Cost(server.url, server.pid, sandbox)
        version = bench.client.info("server")["redis_version"]
        print(f"{os.cpu_count()} CPUs; Redis {version} with AOF (everysec); N = {args.count}; "
              f"sandbox latency {args.latency_ms:g} ms; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for mode in ("product", "bare") if args.warmup else ():
            getattr(bench, mode)(args.warmup, 0.0)
        print(f"{'mode':<9}{'round':>6}{'seconds':>9}{'per s':>8}{'ok':>6}{'cmds/N':>8}"
              f"{'Redis CPU µs/N':>16}{'driver cmds':>13}{'load1':>7}")
        best: dict[str, dict[str, float]] = {}
        for round_ in range(args.rounds):
            for mode in ("product", "bare") if round_ % 2 == 0 else ("bare", "product"):
                r = getattr(bench, mode)(args.count, args.latency_ms)
                c = bench.cost
                per = {"commands": c["commands"] / r.n, "cpu_us": 1e6 * c["cpu"] / r.n}
                print(f"{mode:<9}{round_ + 1:>6}{r.seconds:>9.2f}{r.rate:>8.1f}{r.ok:>6}{per['commands']:>8.1f}"
                      f"{per['cpu_us']:>16.1f}{c['driver']:>13}{r.load:>7.2f}", flush=True)
                if args.commandstats:
                    print("    " + ", ".join(f"{name} {calls / r.n:.2f}" for name, calls in
                                           bench.by_command.most_common() if calls / r.n >= 0.01))
                for note in r.notes:
                    print(f"    {note}")
                failures += r.ok != r.n
                if mode not in best or per["cpu_us"] < best[mode]["cpu_us"]:
                    best[mode] = per
        p, b = best["product"], best["bare"]
        print()
        print(f"product ÷ bare: {p['commands'] / b['commands']:.2f}× the commands "
              f"({p['commands']:.1f} vs {b['commands']:.1f} per cancel), "
              f"{p['cpu_us'] / b['cpu_us']:.2f}× the Redis CPU ({p['cpu_us']:.0f} vs {b['cpu_us']:.0f} µs)")
        ceiling = CORE_SHARE * 1e6 / p["cpu_us"]
        print(f"one Redis, {CORE_SHARE:.0%} of one core: about {ceiling:,.0f} cancels/s "
              f"({ceiling * p['commands']:,.0f} commands/s)")
        if args.idle > 0:
            idle = bench.idle(args.idle)
            print(f"one idle worker process: {idle['commands']:.1f} commands/s, "
                  f"{1000 * idle['cpu']:.1f} ms of Redis CPU per second")
        if failures:
            print(f"{failures} run(s) left cancels unfinished (column ok)")
        return 1 if failures else 0
    finally:
        if bench is not None:
            bench.close()
        if sandbox is not None:
            sandbox.stop()
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
