"""What ``bench/pipeline.py`` runs and prints: a worker process, its CPU, one run's figures.

Kept apart from the driver so that each file stays one readable size.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.support.workers import CELERY

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """The commit ``rev`` checked out into a temporary ``git worktree`` of this repository (its
    code is run by this virtual environment, that tree first on ``PYTHONPATH``), removed after."""
    tree = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


@dataclass
class Run:
    mode: str
    pool: str
    concurrency: int
    latency_ms: float
    n: int
    enqueue_s: float
    seconds: float
    ok: int
    cpu: dict[str, float]
    load: float
    redis_calls: dict[str, int]
    notes: list[str]
    """What went wrong, printed under the run's row: cut off, errors the worker logged."""

    @property
    def worker_ms(self) -> float:
        """Worker CPU milliseconds per cancel: steadier than the rate on a shared machine."""
        return 1000 * self.cpu["worker"] / max(self.ok, 1)

    @property
    def rate(self) -> float:
        """Cancels finished (``ok``) per second; ``N`` per second when every one finished."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


# -- processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant (Linux ``/proc``)."""
    total, stack, seen = 0.0, [pid], set()
    tick = os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def load_average() -> float:
    return os.getloadavg()[0]


class Worker:
    """A Celery worker process in its own process group, logging to a temporary file."""

    def __init__(self, app: str, env: dict[str, str], pool: str | None, concurrency: int, extra: list[str],
                 loglevel: str, celery_app, options: tuple[str, ...] = ()) -> None:
        """Start ``celery -A app [extra] worker [options]`` and return once it answers a ping sent
        through ``celery_app``."""
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{pool or 'default'}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        name = f"bench-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        args = [CELERY, "-A", app, *extra, "worker", f"--loglevel={loglevel}", *(["--pool", pool] if pool else []),
                f"--concurrency={concurrency}", "-n", name, "--without-mingle", "--without-gossip", *options]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        # A connection of our own: the product app's use() closes kombu's process-wide pools.
        with celery_app.connection_for_write() as conn:
            while not celery_app.control.ping(destination=[name], timeout=0.5, connection=conn):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log()[-3000:]
                    self.stop()
                    raise SystemExit(f"worker ({' '.join(args[1:])}) did not start:\n{log}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> list[str]:
        """The worker's ERROR and CRITICAL log lines (JSON from the product, text from Celery)."""
        marks = ('"level":"error"', '"level":"critical"', ": ERROR/", ": CRITICAL/")
        return [line for line in self.log().splitlines() if any(m in line for m in marks)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()
        self.log_path.unlink(missing_ok=True)


# -- output ------------------------------------------------------------------------------

HEADER = (f"{'mode':<10}{'pool':<9}{'-c':>4}{'latency':>9}{'N':>7}{'enqueue s':>11}{'seconds':>9}"
          f"{'cancels/s':>11}{'ok':>6}{'cmds/N':>8}{'CPU ms/N':>10}   CPU s: worker sandbox redis driver  load1")


def row(r: Run) -> str:
    c = r.cpu
    return (f"{r.mode:<10}{r.pool:<9}{r.concurrency:>4}{r.latency_ms:>7.0f}ms{r.n:>7}{r.enqueue_s:>11.2f}"
            f"{r.seconds:>9.2f}{r.rate:>11.1f}{r.ok:>6}{sum(r.redis_calls.values()) / r.n:>8.1f}"
            f"{r.worker_ms:>10.2f}          {c['worker']:>6.1f} {c['sandbox']:>7.1f}"
            f" {c['redis']:>5.1f} {c['driver']:>6.1f}  {r.load:5.2f}")


def print_run(r: Run, commandstats: bool) -> None:
    print(row(r))
    for note in r.notes:
        print(f"    {note}")
    if commandstats:
        print(commands(r))
    sys.stdout.flush()


def commands(r: Run) -> str:
    per = sorted(((calls / r.n, name) for name, calls in r.redis_calls.items()), reverse=True)
    return "    redis commands per cancel: " + ", ".join(f"{name} {x:.2f}" for x, name in per if x >= 0.01)
