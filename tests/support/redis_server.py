"""A throwaway redis-server on a free port, for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence, in a temporary directory; ``url`` is db 0."""

    def __init__(self, prefix: str = "pc-redis-", timeout: float = 10.0):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make setup redis-server` installs it")
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix=prefix)
        self.base = f"redis://127.0.0.1:{self.port}"
        self.url = f"{self.base}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() >= deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not listen on port {self.port} within {timeout}s")
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)
