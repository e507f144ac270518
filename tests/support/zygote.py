"""Celery processes forked from a process that has already loaded Celery and its libraries.

A ``celery -A worker worker`` process spends most of its start loading Celery's command
line (click-repl and prompt_toolkit among it), kombu, redis-py, requests and sentry-sdk,
and the suite starts many of them on two cores (docs/development.md; the figures
are in bench/README.md). The zygote
(``_zygote_main.py``, one per test process, started on first use) loads those once and
forks a child per process asked for; the child then runs exactly what the console script
runs, ``celery.__main__.main()`` with the request's argv, environment and directory, in a
session of its own, and exits as a process does. The product's own modules are not
preloaded: every child imports them fresh, as a deployed worker does.

What a forked child shares with its zygote is what the libraries did at import time. So a
process is forked only when its environment matches the zygote's in everything but the
product's own settings (``config.settings.VARIABLES``, read by our code alone, at run
time): ``REMAP_SIGTERM`` (billiard reads it on import), ``PYTHONPATH`` and the rest must
be the same. Anything else (another app's worker, a test of the unmapped SIGTERM) is
started as a process of its own, as is everything when the zygote cannot start.

``TESTS_NO_ZYGOTE=1`` in the test run's environment starts every one with the console
script instead (to rule the zygote out when a test behaves oddly).

:class:`Child` answers what the tests ask of a ``subprocess.Popen``: ``pid``, ``poll``,
``wait``, ``returncode``, ``send_signal``, ``terminate``, ``kill``. The zygote reaps its
children and reports each exit status.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Mapping

from plural_cancel.config.settings import VARIABLES

MAIN = Path(__file__).with_name("_zygote_main.py")
FREE = frozenset(VARIABLES) | {"PYTEST_CURRENT_TEST"}
"""Variables a forked child may have other values of than its zygote: the product's settings,
and the name of the test running, which pytest changes for every test and nothing reads."""


UNKNOWN = -255
"""The exit status of a child that ended after its zygote had gone."""


def _base(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in FREE}


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Child:
    """A process the zygote forked, as far as ``subprocess.Popen``'s interface goes."""

    def __init__(self, zygote: "Zygote", pid: int, args: list[str]):
        self._zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.status(self.pid)
        if self.returncode is None and not self._zygote.alive() and not _running(self.pid):
            self.returncode = UNKNOWN  # ended after its zygote, which alone could read its status
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._zygote.wait_for_news(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    def __init__(self, env: Mapping[str, str], cwd: Path | str):
        self._proc = subprocess.Popen([sys.executable, str(MAIN)], cwd=cwd, env=dict(env),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._lock = threading.Lock()  # one request at a time: answers come in order
        self._news = threading.Condition()
        self._spawned: list[int] = []
        self._exited: dict[int, int] = {}
        self._mourned = False
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def usable(self) -> bool:
        """Alive; the first time it is found dead, a warning says so."""
        if self.alive():
            return True
        if not self._mourned:
            self._mourned = True
            warnings.warn(f"the zygote exited {self._proc.returncode}: celery processes start by their "
                          "console script from now on", stacklevel=3)
        return False

    def spawn(self, argv: list[str], env: Mapping[str, str], cwd: Path | str, log: Path) -> Child:
        request = json.dumps({"argv": argv, "env": dict(env), "cwd": str(cwd), "log": str(log)})
        with self._lock:
            self._proc.stdin.write(request.encode() + b"\n")
            with self._news:
                if not self._news.wait_for(lambda: self._spawned or self._proc.poll() is not None, 30):
                    raise RuntimeError("the zygote did not fork within 30 s")
                if not self._spawned:
                    raise RuntimeError(f"the zygote exited {self._proc.returncode}")
                pid = self._spawned.pop(0)
        return Child(self, pid, argv)

    def status(self, pid: int) -> int | None:
        with self._news:
            return self._exited.get(pid)

    def wait_for_news(self, timeout: float) -> None:
        with self._news:
            self._news.wait(timeout)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def _read(self) -> None:
        for raw in self._proc.stdout:
            kind, *fields = raw.decode().split()
            with self._news:
                if kind == "spawned":
                    self._spawned.append(int(fields[0]))
                elif kind == "exited":
                    self._exited[int(fields[0])] = int(fields[1])
                self._news.notify_all()
        with self._news:
            self._news.notify_all()


_zygote: Zygote | None = None
_started = threading.Lock()


def zygote_for(env: Mapping[str, str], standard: Mapping[str, str], cwd: Path | str) -> Zygote | None:
    """This test process's zygote (running with the environment ``standard``, started on
    first use) when it can fork a process with ``env``; else None: start that one as a
    process of its own."""
    global _zygote
    if os.environ.get("TESTS_NO_ZYGOTE") or _base(env) != _base(standard):
        return None
    with _started:
        if _zygote is None:
            try:
                _zygote = Zygote(standard, cwd)
            except OSError:
                return None
            atexit.register(_zygote.close)
    return _zygote if _zygote.usable() else None
