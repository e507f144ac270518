"""Real Celery worker and beat processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from tests.support.zygote import zygote_for

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))


def service_env(redis_url: str, plural_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker talking to ``redis_url`` and the sandbox at ``plural_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLURAL_", "SENTRY_", "CANCEL_"))}
    env.update({
        "REDIS_URL": redis_url,
        "PLURAL_BASE_URL": plural_url,
        "PLURAL_CLIENT_ID": "test-client",
        "PLURAL_CLIENT_SECRET": "test-secret-do-not-leak",
        "PYTHONUNBUFFERED": "1",
        "REMAP_SIGTERM": "SIGQUIT",  # as the Procfile and the image run it
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def skewed_clock(seconds: float) -> dict[str, str]:
    """The environment of a process whose host clock runs ``seconds`` ahead (negative: behind):
    ``tests/support/skewed_clock/sitecustomize.py``."""
    return {"PYTHONPATH": str(Path(__file__).parent / "skewed_clock"), "CLOCK_SKEW": str(seconds)}


LOGS: list[Path] = []
"""Every log file a :class:`CeleryProcess` of this test process wrote (``conftest`` removes
them after a run that passed)."""

STANDARD_ENV = service_env("redis://127.0.0.1:6379/0", "http://127.0.0.1:8800/api")
"""The environment the zygote runs with (``tests/support/zygote.py``): a process whose own
differs from it only in the product's settings is forked from it."""


class CeleryProcess:
    """A ``celery -A APP worker|beat`` process in its own process group, logging to a file.

    ``app`` and ``cwd``: ours (``worker``, from the repository root) unless a test runs
    another application's worker (a merchant's host app beside ours)."""

    def __init__(self, kind: str, env: dict[str, str], args: list[str], *, app: str = "worker",
                 cwd: Path | str = ROOT):
        self.kind = kind
        self.log_path = Path(tempfile.mkstemp(prefix=f"pc-{kind}-", suffix=".log")[1])
        LOGS.append(self.log_path)
        self._log = open(self.log_path, "wb")
        argv = [CELERY, "-A", app, kind, *args]
        self.proc = None
        zygote = zygote_for(env, STANDARD_ENV, ROOT)
        if zygote is not None:  # the same process, without loading the libraries again
            try:
                self.proc = zygote.spawn(argv, env, cwd, self.log_path)
            except (OSError, RuntimeError) as exc:  # the zygote is gone: slower, not wrong
                warnings.warn(f"celery {kind} started by its console script: {exc}", stacklevel=2)
        if self.proc is None:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 30.0, marker: str = "ready.") -> "CeleryProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery {self.kind} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"celery {self.kind} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        """SIGKILL the whole process group, as when the host dies."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
            except ProcessLookupError:
                pass
        self._log.close()


def start_worker(env: dict[str, str], *, concurrency: int = 8, hostname: str | None = None,
                 extra: tuple[str, ...] = ()) -> CeleryProcess:
    """Start a worker and wait until it consumes."""
    name = hostname or f"w{time.monotonic_ns()}@%h"
    args = ["--loglevel=INFO", f"--concurrency={concurrency}", "-n", name, "--without-mingle",
            "--without-gossip", *extra]
    return CeleryProcess("worker", env, args).wait_ready()


def start_beat(env: dict[str, str]) -> CeleryProcess:
    return CeleryProcess("beat", env, ["--loglevel=INFO"]).wait_ready(marker="beat: Starting")
