"""A throwaway redis-server on a free port, for tests and benchmarks."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1 in a temporary directory; ``url`` is db 0.

    No persistence by default. With ``aof=True`` it writes an append-only file as
    deployed (``--appendonly yes --appendfsync everysec``, as ``make run`` and the compose
    file run it), so :meth:`kill` then :meth:`restart` plays a crash and a restart of the
    same server: same port, same directory, the data its AOF kept. ``args``: more of
    redis-server's options (``--replicaof 127.0.0.1 PORT``).
    """

    def __init__(self, prefix: str = "pc-redis-", timeout: float = 10.0, aof: bool = False, args: tuple[str, ...] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make setup redis-server` installs it")
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix=prefix)
        self.base = f"redis://127.0.0.1:{self.port}"
        self.url = f"{self.base}/0"
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
        self._argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                      "--dir", self.workdir, *args]
        self._timeout = timeout
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return proc
            except OSError:
                if time.monotonic() >= deadline or proc.poll() is not None:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
                    shutil.rmtree(self.workdir, ignore_errors=True)
                    raise RuntimeError(f"redis-server did not listen on port {self.port} within {self._timeout}s")
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the server, as a crash: no shutdown save; the AOF keeps what was fsynced (≤ 1 s old)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        """Start the server again on the same port and directory (it loads its AOF); returns once it listens."""
        self.kill()
        self.proc = self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)
