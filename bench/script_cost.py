"""What the two scripts of an attempt cost Redis: this tree's beside a baseline commit's, in
the same run, on a redis-server of their own.

Run from the repository root::

    .venv/bin/python bench/script_cost.py [--count 5000] [--rounds 4] [--baseline REV]

Each round runs, in turn, the baseline (checked out into a temporary ``git worktree``, run
by this virtual environment with its tree first on ``PYTHONPATH``) and this tree: ``count``
cancels created, then for each one the admission (claim, breaker, rate-limit slot) and the
settle (finish, the breaker's success, the pace's observation), one after the other on one
connection, as a worker delivers them with no wait. It prints Redis's own figures for them
(``INFO commandstats``: microseconds per ``EVALSHA``; ``INFO cpu``: CPU per cancel), and the
ratio of this tree's to the baseline's, per round and as medians. No Plural, no Celery:
the scripts alone, which is what ``bench/redis_cost.py``'s whole runs cannot tell apart
from the rest.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "7f1b350"
"""The last commit before the retry policy and the composed Lua (``worker/lua.py``)."""


def child(port: int, count: int) -> None:
    """One measurement, in a process whose ``plural_cancel`` is the tree on ``PYTHONPATH``."""
    import redis

    from plural_cancel.worker.attempts import Attempts, Health
    from plural_cancel.worker.breaker import SUCCESS, RedisCircuitBreaker
    from plural_cancel.worker.keys import Keys
    from plural_cancel.worker.ledger import Ledger
    from plural_cancel.worker.ratelimit import RedisRateLimiter

    client = redis.Redis(port=port)
    client.flushall()
    keys = Keys()
    options = dict(result_ttl=3600, stall_timeout=60.0, rate=1e6, queue="q", keys=keys)
    if "retry_budget" in inspect.signature(Ledger.__init__).parameters:  # before the policy held it
        options["retry_budget"] = 600.0
    ledger = Ledger(client, **options)
    breaker = RedisCircuitBreaker(client, keys.breaker, window=10, min_links=5, failure_rate=0.5, cooldown=30)
    attempts = Attempts(ledger, breaker, RedisRateLimiter(client, keys.ratelimit, rate=1e6))
    budget = {"budget": 600.0} if "budget" in inspect.signature(Attempts.admit).parameters else {}
    ledger.create_many([(f"r{i}", f"l{i}") for i in range(count)])
    client.config_resetstat()
    cpu = client.info("cpu")
    before = cpu["used_cpu_sys"] + cpu["used_cpu_user"]
    for i in range(count):
        owner = uuid.uuid4().hex
        admitted = attempts.admit(f"r{i}", f"l{i}", owner, 30, max_wait=10.0, probe_max_wait=10.0, **budget)
        assert admitted.slot is not None and admitted.slot.granted, admitted
        attempts.finish(f"r{i}", f"l{i}", owner, health=Health(SUCCESS, False, called=True, sent_at=admitted.slot.at),
                        state="succeeded", outcome="cancelled", attempted=True)
    cpu = client.info("cpu")
    stats = client.info("commandstats")["cmdstat_evalsha"]
    assert 2 * count <= stats["calls"] <= 2 * count + 2, stats  # two scripts a cancel (and, once, NOSCRIPT each)
    print(f"{stats['usec_per_call']:.2f} {1e6 * (cpu['used_cpu_sys'] + cpu['used_cpu_user'] - before) / count:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="cancels per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.count)
        return
    sys.path.insert(0, str(ROOT))
    from bench.harness import baseline_tree

    with baseline_tree(args.baseline) as baseline:
        compare(baseline, args)


def compare(baseline: Path, args: argparse.Namespace) -> None:
    """``args.rounds`` rounds of the baseline's measurement and this tree's, then the medians."""
    from tests.support.redis_server import RedisServer

    server = RedisServer(prefix="pc-bench-scripts-")
    figures: dict[str, list[tuple[float, float]]] = {"baseline": [], "this tree": []}
    try:
        for round_ in range(1, args.rounds + 1):
            for label, tree in (("baseline", baseline), ("this tree", ROOT)):
                command = [sys.executable, __file__, "--child", str(server.port), "--count", str(args.count)]
                out = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, check=True,
                                     capture_output=True, text=True).stdout.split()
                figures[label].append((float(out[0]), float(out[1])))
                print(f"round {round_}  {label:<9}  {out[0]:>7} us per EVALSHA  {out[1]:>7} us of Redis CPU per cancel",
                      flush=True)
            (b_call, b_cpu), (t_call, t_cpu) = figures["baseline"][-1], figures["this tree"][-1]
            print(f"round {round_}  this tree / baseline: x{t_call / b_call:.2f} per EVALSHA, x{t_cpu / b_cpu:.2f} CPU")
        medians = {label: (statistics.median(c for c, _ in runs), statistics.median(u for _, u in runs))
                   for label, runs in figures.items()}
        (b_call, b_cpu), (t_call, t_cpu) = medians["baseline"], medians["this tree"]
        print(f"\nmedians: baseline {b_call:.1f} us per EVALSHA, {b_cpu:.0f} us CPU per cancel; this tree "
              f"{t_call:.1f}, {t_cpu:.0f}: x{t_call / b_call:.2f} and x{t_cpu / b_cpu:.2f} ({args.baseline})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
