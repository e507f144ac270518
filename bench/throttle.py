"""Throttling that tracks Plural: the fleet's pace and goodput against a Plural that throttles,
this tree's controller (``worker.pace``) beside the one it replaced, in the same run.

Run from the repository root::

    .venv/bin/python bench/throttle.py [--rates 10,100] [--baseline REV | --no-baseline]
                                       [--cases one,noise,lower,both]

For each design (``--baseline``: a commit of the controller before, checked out into a
temporary ``git worktree`` and run by this virtual environment; then this tree), and each
``PLURAL_RATE_LIMIT`` of ``--rates``, two worker processes of 128 threads drain a backlog
against the sandbox, through four cases:

- ``one 429``: one cancel answered 429 mid-drain: the pace sent in the second 1-2 s after
  it and 4-5 s after it, as shares of the limit (aims: >= 0.90 and >= 0.95, the limiter's
  full pace being 0.97);
- ``5 % 429s``: 5 % of cancels answered 429 at random (Retry-After 1): goodput over 20 s,
  as a share of the limit (aim: >= 0.85; the ceiling is about 0.92);
- ``Plural's limit 0.6``: the sandbox's own limit at 0.6 of ours: goodput as a share of
  Plural's limit and the share of cancels throttled over 30-60 s after the drop, and the
  worst 10-s window's share from 30 s on (aims: >= 0.90, <= 10 %, <= 20 %);
- ``both``: the two at once (aims: >= 0.85 of Plural's limit, <= 15 %).

It prints each case per design as it goes, then a summary: this tree's figures, their
ratios to the baseline's, and whether each meets its aim (``AIMS``). No timed asserts: the
figures are the output. About 12 minutes in all for two rates.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import baseline_tree  # noqa: E402
from plural_cancel.config.settings import Settings  # noqa: E402
from plural_cancel.tasks import enqueue_many  # noqa: E402
from plural_cancel.worker import create_app  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.sandbox import is_throttle, start_sandbox_process  # noqa: E402
from tests.support.workers import CeleryProcess, service_env  # noqa: E402

BASELINE = "70814a8"
"""The last commit with the controller before ``worker.pace`` (a 429 halved the rate for a minute)."""

LOWER = 0.6
"""Plural's own limit, as a share of ``PLURAL_RATE_LIMIT``."""

AIMS = {
    "one 429": {"after 1-2 s": (">=", 0.90), "after 4-5 s": (">=", 0.95)},
    "5 % 429s": {"goodput / limit": (">=", 0.85)},
    f"Plural's limit {LOWER}": {"goodput / theirs": (">=", 0.90), "throttled": ("<=", 0.10),
                                "worst 10 s": ("<=", 0.20)},
    "both": {"goodput / theirs": (">=", 0.85), "throttled": ("<=", 0.15)},
}
"""What each figure must reach (the issue's): printed ``met`` or ``MISSED`` beside it."""


def verdict(case: str, key: str, value: float) -> str:
    op, aim = AIMS.get(case, {}).get(key, (None, None))
    if op is None:
        return ""
    met = value >= aim if op == ">=" else value <= aim
    return f" [{op} {aim:g}: {'met' if met else 'MISSED'}]"


def workers(tree: Path, env: dict[str, str]) -> list[CeleryProcess]:
    """Two workers of ``tree``'s code (on ``PYTHONPATH``, ahead of this tree's install)."""
    env = {**env, "PYTHONPATH": str(tree)}
    started = [CeleryProcess("worker", env, ["--loglevel=INFO", "--concurrency=128", "-n",
                                             f"bench-{n}-{time.monotonic_ns()}@%h", "--without-mingle",
                                             "--without-gossip"], cwd=tree) for n in range(2)]
    return [worker.wait_ready(60) for worker in started]


def puts(sandbox, since: float, until: float) -> list[dict]:
    return [r for r in sandbox.requests() if r["method"] == "PUT" and since <= r["timestamp"] < until]


def window(sandbox, since: float, until: float) -> tuple[float, float, float]:
    """(sent a second, accepted a second, share throttled) of the cancels arriving in [since, until)."""
    calls = puts(sandbox, since, until)
    throttled = sum(map(is_throttle, calls))
    return len(calls) / (until - since), (len(calls) - throttled) / (until - since), throttled / max(1, len(calls))


class Case:
    def __init__(self, app, sandbox, client, limit: float):
        self.app, self.sandbox, self.client, self.limit = app, sandbox, client, limit

    def start(self, seconds: float, **faults) -> float:
        """A fresh database and sandbox, ``faults`` set, and a backlog ``seconds`` long at the limit."""
        self.client.flushdb()
        self.sandbox.reset_faults()
        self.sandbox.clear_requests()
        if faults:
            self.sandbox.set_faults(**faults)
        links = self.sandbox.create_links(int(self.limit * seconds * 1.2) + 50, prefix=f"pl-b{time.monotonic_ns()}-")
        started = time.time()
        enqueue_many(links, app=self.app)
        return started

    def one_429(self) -> dict[str, float]:
        started = self.start(20)
        time.sleep(5)
        self.sandbox.set_faults(throttle_rate=1.0)
        while not any(map(is_throttle, puts(self.sandbox, started, time.time() + 1))):
            time.sleep(0.005)
        self.sandbox.set_faults(throttle_rate=0.0)
        at = min(r["timestamp"] for r in puts(self.sandbox, started, time.time() + 1) if is_throttle(r))
        time.sleep(6)
        return {"after 1-2 s": window(self.sandbox, at + 1, at + 2)[0] / self.limit,
                "after 4-5 s": window(self.sandbox, at + 4, at + 5)[0] / self.limit}

    def noise(self) -> dict[str, float]:
        started = self.start(30, throttle_rate=0.05, retry_after=1)
        time.sleep(25)
        _, accepted, share = window(self.sandbox, started + 5, started + 25)
        return {"goodput / limit": accepted / self.limit, "throttled": share}

    def lower(self, noise: float = 0.0) -> dict[str, float]:
        theirs = LOWER * self.limit
        started = self.start(65, limit_rps=theirs, throttle_rate=noise, retry_after=1)
        time.sleep(62)
        _, accepted, share = window(self.sandbox, started + 30, started + 60)
        worst = max(window(self.sandbox, t, t + 10)[2] for t in range(int(started) + 30, int(started) + 51))
        return {"goodput / theirs": accepted / theirs, "throttled": share, "worst 10 s": worst}


def measure(tree: Path, label: str, rate: float, redis_url: str, sandbox,
            cases: set[str]) -> dict[str, dict[str, float]]:
    settings = {"PLURAL_RATE_LIMIT": rate}
    env = service_env(redis_url, sandbox.url, **settings)
    fleet = workers(tree, env)
    app = create_app(Settings.from_env({"REDIS_URL": redis_url, "REDIS_WAIT_REPLICAS": "0",
                                        "PLURAL_RATE_LIMIT": str(rate)}))
    case = Case(app, sandbox, redis.Redis.from_url(redis_url), rate)
    try:
        out = {}
        for key, name, run in (("one", "one 429", case.one_429), ("noise", "5 % 429s", case.noise),
                               ("lower", f"Plural's limit {LOWER}", case.lower),
                               ("both", "both", lambda: case.lower(0.05))):
            if key not in cases:
                continue
            out[name] = run()
            print(f"  {label:<9} {rate:>5g}/s  {name:<20} "
                  + "  ".join(f"{k} {v:.2f}" for k, v in out[name].items()), flush=True)
        return out
    finally:
        app.close()
        for worker in fleet:
            worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,100", help="PLURAL_RATE_LIMIT values, comma-separated")
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose controller is the baseline")
    parser.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    parser.add_argument("--cases", default="one,noise,lower,both", help="which cases, comma-separated")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    cases = set(args.cases.split(","))
    designs = [("this tree", ROOT)]
    with contextlib.ExitStack() as stack:
        if not args.no_baseline:
            designs.insert(0, (f"baseline {args.baseline}", stack.enter_context(baseline_tree(args.baseline))))
        report(designs, rates, cases)


def report(designs: list[tuple[str, Path]], rates: list[float], cases: set[str]) -> None:
    """Every design at every rate, then the summary."""
    server = RedisServer(prefix="pc-bench-throttle-")
    sandbox = start_sandbox_process()
    try:
        results = {}
        for rate in rates:
            for label, tree in designs:
                results[label, rate] = measure(tree, label.split()[0], rate, server.url, sandbox, cases)
        print("\nsummary (this tree, and its ratio to the baseline where there is one)")
        for rate in rates:
            ours = results["this tree", rate]
            base = results.get((designs[0][0], rate)) if len(designs) > 1 else None
            for name, figures in ours.items():
                cells = []
                for k, v in figures.items():
                    ratio = f" (x{v / base[name][k]:.2f})" if base and base[name][k] else ""
                    cells.append(f"{k} {v:.2f}{ratio}{verdict(name, k, v)}")
                print(f"  {rate:>5g}/s  {name:<20} " + "  ".join(cells))
    finally:
        sandbox.stop()
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
