"""``plural-cancel health --worker|--beat [--ready]``: liveness and readiness without Redis.

End to end: a real worker and two real beats (one holds RedBeat's lock, one stands by),
each writing its heartbeat in a ``HEALTH_DIR`` of its own; a Redis of the test's own,
killed for longer than the health check's max age and started again; the command run
as a container's healthcheck runs it. Then the judgement itself, on facts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plural_cancel.heartbeat import BEAT, LOOP_STALL_LIMIT, WORKER, Heartbeat, heartbeat_path, judge, read
from tests.conftest import wait_for
from tests.support.redis_server import RedisServer
from tests.support.workers import ROOT, CeleryProcess, service_env, start_beat, start_worker

CLI = str(Path(sys.executable).with_name("plural-cancel"))
MAX_AGE = 5.0
"""The command's ``--max-age`` here (10 s by default, as compose runs it; shorter, so that
the test waits less): Redis stays away longer than this. Heartbeats are written every 2 s."""


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    if "--max-age" not in args:
        args = (*args, "--max-age", str(MAX_AGE))
    return subprocess.run([CLI, "health", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def code(env: dict[str, str], *args: str) -> int:
    return health(env, *args).returncode


POLL = 0.5
"""Seconds between two runs of the command while a test waits for its verdict to change.
Each run is a process of its own and heartbeats change every 2 s: running it
back to back would only take CPU from the tests beside this one."""


@pytest.fixture
def redis_server_of_our_own():
    server = RedisServer(prefix="pc-redis-health-")
    yield server
    server.stop()


@pytest.mark.slow
def test_worker_and_beat_stay_live_while_redis_is_away_and_not_after_they_die(
        redis_server_of_our_own, healthy_sandbox, services, tmp_path):
    redis_server = redis_server_of_our_own
    envs = {name: service_env(redis_server.url, healthy_sandbox.url, HEALTH_DIR=str(tmp_path / name))
            for name in ("worker", "beat1", "beat2")}
    worker = start_worker(envs["worker"], concurrency=4)
    services.append(worker)
    services.append(start_beat(envs["beat1"]))
    wait_for(lambda: "beat: Acquired lock" in services[-1].log(), 15, message="the first beat holds the lock")
    standby = CeleryProcess("beat", envs["beat2"], ["--loglevel=INFO"]).wait_ready(marker="beat: Starting")
    services.append(standby)
    worker_env, beat_env, standby_env = envs["worker"], envs["beat1"], envs["beat2"]

    wait_for(lambda: code(worker_env, "--worker", "--ready") == 0, 10, POLL, "the worker ready")
    live = health(worker_env, "--worker")
    assert live.returncode == 0 and "live" in live.stdout and "connected to the broker" in live.stdout
    wait_for(lambda: code(beat_env, "--beat", "--ready") == 0, 10, POLL, "the lock holder ready")
    assert code(standby_env, "--beat") == 0
    waiting = health(standby_env, "--beat", "--ready")
    assert waiting.returncode == 1 and "no tick yet" in waiting.stderr
    assert len(waiting.stderr.strip().splitlines()) == 1 and waiting.stdout == ""

    # Redis goes away: nobody is ready, everybody stays live, for longer than the max age.
    redis_server.kill()
    down_at = time.monotonic()
    not_ready = wait_for(lambda: (r := health(worker_env, "--worker", "--ready")).returncode == 1 and r, 10,
                         POLL, "the worker not ready")
    assert "not connected to the broker" in not_ready.stderr
    wait_for(lambda: code(beat_env, "--beat", "--ready") == 1, MAX_AGE + 5, POLL, "beat not ready")
    samples = []
    while time.monotonic() - down_at < MAX_AGE + 3:
        samples.append((code(worker_env, "--worker"), code(beat_env, "--beat"), code(standby_env, "--beat")))
        time.sleep(POLL)
    assert samples and set(samples) == {(0, 0, 0)}, samples

    # Redis is back (empty: the lock is gone): the worker is ready again, and one beat of the two.
    redis_server.restart()
    wait_for(lambda: code(worker_env, "--worker", "--ready") == 0, 40, POLL, "the worker ready again")
    wait_for(lambda: code(beat_env, "--beat", "--ready") + code(standby_env, "--beat", "--ready") == 1, 40,
             POLL, "one beat ready again")
    assert (code(worker_env, "--worker"), code(beat_env, "--beat"), code(standby_env, "--beat")) == (0, 0, 0)

    # Killed (the whole process group, no shutdown): not live once the heartbeat is older than the max age.
    for process in services:
        process.kill_group()
    killed_at = time.monotonic()
    for env, kind in ((worker_env, "--worker"), (beat_env, "--beat"), (standby_env, "--beat")):
        dead = wait_for(lambda: (r := health(env, kind, "--max-age", "3")).returncode == 1 and r, 10,
                        POLL, f"{kind} not live")
        assert "not live: heartbeat" in dead.stderr and "(max 3 s)" in dead.stderr
    assert time.monotonic() - killed_at >= 1.0  # the last heartbeat, at most 2 s old, had to age past 3 s


@pytest.mark.slow
def test_a_ticking_beat_is_ready_at_every_read_of_its_heartbeat(redis_url, healthy_sandbox, services, tmp_path):
    """One writer per beat process. Celery's banner builds a second scheduler (``lazy``) only
    to describe it; had that one a heartbeat of its own, it would rewrite the file every 2 s
    with no tick in it, and a ready beat would read as not ready half the time."""
    env = service_env(redis_url, healthy_sandbox.url, HEALTH_DIR=str(tmp_path))
    beat = start_beat(env)
    services.append(beat)
    path = heartbeat_path(str(tmp_path), BEAT)
    wait_for(lambda: (read(path) or {}).get("ticked_at"), 15, 0.1, "beat's first tick in its heartbeat")
    samples = []
    for _ in range(40):  # 6 s: three rewrites of each writer, were there two
        samples.append(read(path))
        time.sleep(0.15)
    assert all(facts and facts["ticked_at"] for facts in samples), [f and f.get("ticked_at") for f in samples]
    assert "cannot write" not in beat.log()


def test_the_command_needs_a_kind_and_says_where_it_looked(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HEALTH_DIR": str(tmp_path)}
    env.update({k: v for k, v in __import__("os").environ.items() if k == "PYTHONPATH"})
    neither = health(env)
    assert neither.returncode == 2 and "--worker or --beat" in neither.stderr
    missing = health(env, "--beat")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (f"plural-cancel: beat not live: no heartbeat file at "
                                      f"{heartbeat_path(str(tmp_path), BEAT)} "
                                      "(not started here, or another HEALTH_DIR)")


NOW = 1_800_000_000.0


@pytest.mark.parametrize("kind, facts, ready, ok, says", [
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": True, "loop_at": NOW - 1}, False, True, "live"),
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": True, "loop_at": NOW - 1}, True, True, "ready"),
    (WORKER, {"pid": 7, "at": NOW - 11, "connected": True, "loop_at": NOW - 11}, False, False, "11.0 s old"),
    # waiting for Redis: live however long, never ready
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": False, "loop_at": NOW - 3600}, False, True, "waiting"),
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": False, "loop_at": NOW - 1}, True, False, "not connected"),
    # connected, but the event loop stopped turning: not ready soon, not live once it is wedged
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": True, "loop_at": NOW - 30}, True, False, "turned 30.0 s ago"),
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": True, "loop_at": NOW - 30}, False, True, "live"),
    (WORKER, {"pid": 7, "at": NOW - 1, "connected": True, "loop_at": NOW - LOOP_STALL_LIMIT - 1}, False, False,
     "has not turned"),
    (BEAT, {"pid": 8, "at": NOW - 1, "ticked_at": None}, False, True, "live"),
    (BEAT, {"pid": 8, "at": NOW - 1, "ticked_at": None}, True, False, "no tick yet"),
    (BEAT, {"pid": 8, "at": NOW - 1, "ticked_at": NOW - 2}, True, True, "ticked 2.0 s ago"),
    (BEAT, {"pid": 8, "at": NOW - 1, "ticked_at": NOW - 20}, True, False, "last tick 20.0 s ago"),
    (BEAT, None, False, False, "no heartbeat file"),
])
def test_the_judgement(kind, facts, ready, ok, says):
    verdict = judge(kind, facts, NOW, MAX_AGE, ready)
    assert verdict.ok is ok and says in verdict.line


def test_a_heartbeat_is_rewritten_whole_and_at_once_on_a_change(tmp_path):
    clock = iter(range(100, 200)).__next__
    path = heartbeat_path(str(tmp_path / "new"), WORKER)
    heartbeat = Heartbeat(path, interval=0.05, clock=lambda: float(clock()), connected=False).start()
    try:
        first = read(path)
        assert first["connected"] is False and first["at"] >= 100
        heartbeat.update(connected=True)
        assert read(path)["connected"] is True
        wait_for(lambda: read(path)["at"] > first["at"] + 2, 5, 0.01, message="rewritten by the thread")
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no scratch file left behind
    finally:
        heartbeat.stop()


def test_the_health_command_loads_neither_celery_nor_redis_nor_requests(tmp_path):
    """Every container's healthcheck runs it every few seconds: it must not pay for the app.
    The other commands load theirs when called (``base.Commands``), and each command the
    group lists lazily is one its module holds."""
    import importlib

    from plural_cancel.cli import LAZY, cli

    probe = ("import sys\nfrom plural_cancel.cli import main\ncode = main(['health', '--worker'])\n"
             "print(code, sorted(m for m in ('celery', 'kombu', 'redis', 'requests', 'plural_cancel.worker')\n"
             "                   if m in sys.modules))")
    env = {**os.environ, "HEALTH_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == "1 []", done.stdout + done.stderr  # not live (no file), nothing heavy
    assert "worker not live: no heartbeat file" in done.stderr
    for module in set(LAZY.values()):
        names = {command.name for command in importlib.import_module(f"plural_cancel.cli.{module}").COMMANDS}
        assert names == {name for name, where in LAZY.items() if where == module}, module
    assert set(cli.list_commands(None)) == {*LAZY, "health"}
