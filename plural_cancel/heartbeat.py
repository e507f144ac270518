"""Liveness and readiness of a worker or beat, read from a file: no round trip to Redis.

This module imports nothing but the standard library, and lives outside ``worker`` (whose
package brings in Celery): ``plural-cancel health``, which every container's healthcheck
runs every few seconds, loads neither Celery nor requests.

Each process keeps a *heartbeat*: a thread of its own rewrites a small JSON file in
``HEALTH_DIR`` every :data:`HEARTBEAT_INTERVAL` seconds, and at once whenever a fact in
it changes. The thread needs nothing but the process, so the file stays fresh while
Redis is away and the worker or beat waits for it: an orchestrator must not restart
them for a Redis blip, they carry on by themselves when it is back (``config.celery``).
``plural-cancel health --worker|--beat [--ready]`` judges the file (:func:`check`).

- **live**: the heartbeat is at most ``max_age`` seconds old; and, for a worker
  connected to the broker, its event loop has turned within :data:`LOOP_STALL_LIMIT`
  (a worker whose loop is stuck although connected is wedged).
- **ready**: live, and a worker is connected to the broker with its event loop turning
  within ``max_age`` (a consumer bootstep says so: ``worker.health.BrokerReady``); beat has
  finished a tick within ``max_age``, which means it holds RedBeat's lock and Redis
  answers. A standby beat, waiting for the lock, is live but not ready.

Times are the wall clock (``time.time``): the file is written by one process and read by
another.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

WORKER, BEAT = "worker", "beat"

HEARTBEAT_INTERVAL = 2.0
"""Seconds between rewrites of a heartbeat file (and between the event loop's marks)."""

DEFAULT_MAX_AGE = 10.0
"""Seconds: the oldest heartbeat (and, for readiness, loop turn or beat tick) judged fresh."""

LOOP_STALL_LIMIT = 120.0
"""Seconds a connected worker's event loop may go without turning before it counts as
wedged (not live). Longer than any wait inside the loop on a Redis that stopped
answering (30-s socket timeout, then the reconnect that marks the worker disconnected)."""


def heartbeat_path(health_dir: str, kind: str) -> Path:
    """The heartbeat file of a ``worker`` or ``beat`` in ``health_dir``."""
    return Path(health_dir) / f"plural-cancel-{kind}.heartbeat"


class Heartbeat:
    """A daemon thread that rewrites ``path`` with this process's facts every ``interval`` seconds.

    The file is a JSON object: ``pid``, ``at`` (when written, seconds since the epoch) and
    the facts given to :meth:`update`. Each write replaces the file whole (``os.replace``),
    so a reader never sees half of one.
    """

    def __init__(self, path: Path, interval: float = HEARTBEAT_INTERVAL, clock: Callable[[], float] = time.time,
                 **facts):
        self.path = path
        self.interval = interval
        self.clock = clock
        self._facts = {"pid": os.getpid(), **facts}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> "Heartbeat":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("health: cannot create %s (%s); plural-cancel health will say not live",
                      self.path.parent, exc.strerror or exc)
        self.write()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing; the file stays and ages, so the health check turns to not live."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1)

    def update(self, **facts) -> None:
        """Change some facts and write them at once."""
        self.note(**facts)
        self.write()

    def note(self, **facts) -> None:
        """Change some facts, written at the next beat."""
        with self._lock:
            self._facts.update(facts)

    def write(self) -> None:
        with self._lock:
            facts = dict(self._facts, at=self.clock())
            scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            try:
                scratch.write_text(json.dumps(facts))
                os.replace(scratch, self.path)
            except OSError as exc:
                if not self._failing:  # once, not every interval
                    log.error("health: cannot write %s (%s)", self.path, exc.strerror or exc)
                self._failing = True
            else:
                self._failing = False

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.write()


@dataclass(frozen=True)
class Verdict:
    """What ``plural-cancel health`` says: ``ok`` (exit 0) and one line."""

    ok: bool
    line: str


def read(path: Path) -> dict | None:
    """A heartbeat file's facts, or None when it is missing or unreadable."""
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and isinstance(facts.get("at"), (int, float)) else None


def judge(kind: str, facts: dict | None, now: float, max_age: float = DEFAULT_MAX_AGE,
          ready: bool = False, where: Path | None = None) -> Verdict:
    """Liveness (or, with ``ready``, readiness) of a ``worker`` or ``beat`` from its heartbeat's
    facts; ``where`` names the file in the line when there is none."""
    if facts is None:
        return Verdict(False, f"{kind} not live: no heartbeat file{f' at {where}' if where else ''} "
                              "(not started here, or another HEALTH_DIR)")
    who = f"{kind} (pid {facts.get('pid')})"
    age = now - facts["at"]
    if age > max_age:
        return Verdict(False, f"{who} not live: heartbeat {age:.1f} s old (max {max_age:g} s)")
    if kind == WORKER:
        connected, loop_at = facts.get("connected"), facts.get("loop_at")
        loop_age = None if loop_at is None else now - loop_at
        if connected and loop_age is not None and loop_age > LOOP_STALL_LIMIT:
            return Verdict(False, f"{who} not live: connected, but its event loop has not turned for "
                                  f"{loop_age:.0f} s")
        if not ready:
            return Verdict(True, f"{who} live: heartbeat {age:.1f} s old; "
                                 + ("connected to the broker" if connected else "waiting for the broker"))
        if not connected:
            return Verdict(False, f"{who} not ready: not connected to the broker (waiting for Redis)")
        if loop_age is None or loop_age > max_age:
            return Verdict(False, f"{who} not ready: event loop last turned "
                                  + ("never" if loop_age is None else f"{loop_age:.1f} s ago"))
        return Verdict(True, f"{who} ready: connected to the broker, event loop turned {loop_age:.1f} s ago")
    ticked_at = facts.get("ticked_at")
    tick_age = None if ticked_at is None else now - ticked_at
    if not ready:
        return Verdict(True, f"{who} live: heartbeat {age:.1f} s old")
    if tick_age is None:
        return Verdict(False, f"{who} not ready: no tick yet (waiting for RedBeat's lock, or for Redis)")
    if tick_age > max_age:
        return Verdict(False, f"{who} not ready: last tick {tick_age:.1f} s ago (Redis away, or the lock lost)")
    return Verdict(True, f"{who} ready: ticked {tick_age:.1f} s ago")


def check(health_dir: str, kind: str, max_age: float = DEFAULT_MAX_AGE, ready: bool = False,
          now: float | None = None) -> Verdict:
    """Judge the heartbeat file of this host's ``worker`` or ``beat`` in ``health_dir``."""
    path = heartbeat_path(health_dir, kind)
    return judge(kind, read(path), time.time() if now is None else now, max_age, ready, path)
