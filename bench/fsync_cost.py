"""What ``appendfsync always`` costs a producer, against the ``everysec`` that ``make run`` and
the compose file use: ``enqueue_many`` and ``enqueue_cancel`` on each, same run.

Run from the repository root::

    .venv/bin/python bench/fsync_cost.py [--links 20000] [--singles 2000] [--rounds 3] [--kills 20]

It starts two ``redis-server`` processes on free ports, each with AOF in a directory of its
own (under ``$TMPDIR``, /tmp by default: the same disk as the repository here), one with
``--appendfsync everysec``, one with ``--appendfsync always``; no worker runs. Each round
takes the two in turn, each on a flushed database: one ``enqueue_many`` of ``--links`` new
links (records and messages, pipelined), then ``--singles`` calls of ``enqueue_cancel``,
timed one by one. It prints each round, then the medians of the rounds, their ratio, and
each server's ``aof_delayed_fsync`` (``everysec`` only: how often a slow fsync made Redis
hold back the AOF write itself, when even a crash of the process alone loses what it had
acknowledged).

``--kills N`` then crashes the ``everysec`` server N times: ``enqueue_cancel`` one by one
for a random 0.3-1.3 s (a random phase against the once-a-second fsync), SIGKILL right
after the last acknowledgement, restart on the same AOF, and count the acknowledged
Request-IDs that have no record. A SIGKILL ends the process only: what Redis had written
to the AOF is in the kernel's page cache and survives, fsynced or not (a host crash would
lose what was not fsynced, which this cannot play).
"""

from __future__ import annotations

import argparse
import random
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

MODES = ("everysec", "always")


def filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), e.g. ``ext4``."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def run(server: RedisServer, mode: str, args, round_: int) -> dict[str, float]:
    """One round on ``server``: seconds for the batch, and the single calls' median and p99."""
    redis.Redis.from_url(server.url).flushdb()
    app = create_app(Settings.from_env({"REDIS_URL": server.url}))
    tag = f"r{round_}{mode[:2]}"
    links = [f"pl-{tag}-b{i}" for i in range(args.links)]
    started = time.perf_counter()
    enqueue_many(links, app=app)
    batch = time.perf_counter() - started
    singles = []
    for n in range(args.singles):
        started = time.perf_counter()
        enqueue_cancel(f"pl-{tag}-s{n}", app=app)
        singles.append(time.perf_counter() - started)
    app.close()
    return {"batch": batch, "single": statistics.median(singles), "single_p99": p99(singles)}


def crash(server: RedisServer, trial: int) -> tuple[int, int]:
    """Enqueue one by one, SIGKILL right after an acknowledgement, restart; returns the
    enqueues acknowledged and how many of them have no record after the restart."""
    redis.Redis.from_url(server.url).flushdb()
    app = create_app(Settings.from_env({"REDIS_URL": server.url}))
    acknowledged = []
    until = time.monotonic() + random.uniform(0.3, 1.3)
    while time.monotonic() < until:
        acknowledged.append(enqueue_cancel(f"pl-k{trial}-{len(acknowledged)}", app=app))
    server.kill()
    app.close()
    server.restart()
    client = redis.Redis.from_url(server.url)
    while True:  # it listens before it has loaded its AOF, answering LOADING meanwhile
        try:
            if client.info("persistence")["loading"] == 0:
                break
        except redis.BusyLoadingError:
            pass
        time.sleep(0.05)
    app = create_app(Settings.from_env({"REDIS_URL": server.url}))
    missing = sum(1 for status in app.runtime.ledger.statuses(acknowledged) if status is None)
    app.close()
    return len(acknowledged), missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=int, default=20000, help="links in the one enqueue_many call")
    parser.add_argument("--singles", type=int, default=2000, help="enqueue_cancel calls, one by one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=0, help="SIGKILLs of the everysec server, after the rounds")
    args = parser.parse_args()
    servers = {mode: RedisServer(prefix=f"pc-bench-fsync-{mode}-", aof=True, args=("--appendfsync", mode))
               for mode in MODES}
    try:
        for mode, server in servers.items():
            seen = redis.Redis.from_url(server.url).config_get("appendfsync")["appendfsync"]
            assert seen == mode, f"{mode} server runs with appendfsync {seen}"
            print(f"{mode}: redis-server on port {server.port}, AOF in {server.workdir} "
                  f"({filesystem(server.workdir)})", flush=True)
        results = {mode: [] for mode in MODES}
        for round_ in range(1, args.rounds + 1):
            for mode in (MODES if round_ % 2 else MODES[::-1]):  # alternate which goes first
                result = run(servers[mode], mode, args, round_)
                results[mode].append(result)
                print(f"round {round_} {mode:8s}: enqueue_many({args.links:,}) {result['batch']:.2f} s "
                      f"({args.links / result['batch']:,.0f}/s); enqueue_cancel median "
                      f"{result['single'] * 1000:.3f} ms, p99 {result['single_p99'] * 1000:.3f} ms", flush=True)
        med = {mode: {k: statistics.median(r[k] for r in results[mode]) for k in ("batch", "single", "single_p99")}
               for mode in MODES}
        every, always = med["everysec"], med["always"]
        print(f"enqueue_many({args.links:,}): {every['batch']:.2f} s with everysec, {always['batch']:.2f} s "
              f"with always (x{always['batch'] / every['batch']:.2f})")
        print(f"enqueue_cancel: {every['single'] * 1000:.3f} ms with everysec, {always['single'] * 1000:.3f} ms "
              f"with always (+{(always['single'] - every['single']) * 1000:.3f} ms a call, "
              f"x{always['single'] / every['single']:.2f}); p99 {every['single_p99'] * 1000:.3f} vs "
              f"{always['single_p99'] * 1000:.3f} ms")
        for mode, server in servers.items():
            info = redis.Redis.from_url(server.url).info("persistence")
            print(f"{mode}: aof_delayed_fsync {info.get('aof_delayed_fsync', 0)}")
        if args.kills:
            trials = [crash(servers["everysec"], trial) for trial in range(args.kills)]
            print(f"everysec, SIGKILL right after an acknowledged enqueue_cancel, {args.kills} times: "
                  f"{sum(m for _, m in trials)} of {sum(a for a, _ in trials):,} acknowledged enqueues lost "
                  f"(per kill: {', '.join(str(m) for _, m in trials)})")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
