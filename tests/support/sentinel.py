"""A throwaway Redis Sentinel group: a master, one replica and three ``redis-sentinel``
processes, each on a free port in a temporary directory, for tests that fail the master over."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.support.redis_server import RedisServer, free_port

MASTER = "m"
"""The master's name in the Sentinels' configuration (``REDIS_SENTINEL_MASTER``)."""

DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelGroup:
    """Master and replica (``servers``, by port) watched by three Sentinels with a quorum of 2."""

    def __init__(self, timeout: float = 30.0):
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed: `make redis-server` installs it")
        self.servers: dict[int, RedisServer] = {}
        self.sentinel_procs: list[subprocess.Popen] = []
        self.workdir = tempfile.mkdtemp(prefix="pc-sentinel-")
        try:
            # No 5-s wait before a full resync (a demoted master rejoins by one).
            quick = ("--repl-diskless-sync-delay", "0")
            master = RedisServer(prefix="pc-sentinel-master-", args=quick)
            self.servers[master.port] = master
            replica = RedisServer(prefix="pc-sentinel-replica-",
                                  args=(*quick, "--replicaof", "127.0.0.1", str(master.port)))
            self.servers[replica.port] = replica
            self.sentinels = [free_port() for _ in range(3)]
            for port in self.sentinels:
                self.sentinel_procs.append(self._start_sentinel(binary, port, master.port))
            self.wait_settled(master.port, timeout)
        except BaseException:
            self.stop()
            raise

    def _start_sentinel(self, binary: str, port: int, master_port: int) -> subprocess.Popen:
        config = Path(self.workdir, f"sentinel-{port}.conf")  # Sentinel rewrites it: one file each
        config.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                          f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                          f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                          f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n")
        proc = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return proc
            except OSError:
                if time.monotonic() >= deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError(f"redis-sentinel did not listen on port {port}")
                time.sleep(0.05)

    @property
    def env(self) -> dict[str, str]:
        """The settings that point the product at this group."""
        return {"REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in self.sentinels),
                "REDIS_SENTINEL_MASTER": MASTER}

    def sentinel(self, port: int) -> redis.Redis:
        """A plain client of one Sentinel. Its commands go through ``execute_command("SENTINEL X", ...)``:
        redis-py's ``sentinel_*`` methods pass options (``once``, ``return_responses``) meant for
        ``redis.sentinel.Sentinel`` on to the reply's parser, which refuses them (redis 6.4)."""
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int | None:
        """The master's port as every Sentinel names it, or None while they disagree."""
        named = set()
        for port in self.sentinels:
            with self.sentinel(port) as client:
                named.add(int(client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER)[1]))
        return named.pop() if len(named) == 1 else None

    def wait_settled(self, master_port: int, timeout: float) -> None:
        """Until every Sentinel names ``master_port``, knows the two others, and sees a
        replica of it that is linked and streaming (acknowledged within the last second):
        a failover can then happen."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._settled(master_port):
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the Sentinel group did not settle on master {master_port} in {timeout}s")
            time.sleep(0.2)

    def wait_replica_linked(self, timeout: float = 40.0) -> None:
        """Until the master has a replica streaming from it (the demoted master, after a
        failover, once Sentinel has reconfigured it): a crash of the master can then be
        failed over. Sooner than :meth:`wait_settled`, which waits for the Sentinels' own
        view of the link (their INFO every 10 s while the master is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_port()
                if port is not None:
                    with redis.Redis(port=port, socket_timeout=2) as master:
                        info = master.info("replication")
                    if any(isinstance(v, dict) and v.get("state") == "online" and v.get("lag", 99) <= 1
                           for k, v in info.items() if k.startswith("slave")):
                        return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no replica streaming from the master within {timeout}s")

    def _settled(self, master_port: int) -> bool:
        if self.master_port() != master_port:
            return False
        for port in self.sentinels:
            with self.sentinel(port) as client:
                if len(client.execute_command("SENTINEL SENTINELS", MASTER)) != len(self.sentinels) - 1:
                    return False
                replicas = [r for r in client.execute_command("SENTINEL SLAVES", MASTER)
                            if not (r["is_sdown"] or r["is_odown"])]
                if not any(r.get("master-link-status") == "ok" for r in replicas):
                    return False
        with redis.Redis(port=master_port, socket_timeout=2) as master:
            info = master.info("replication")
        return info["role"] == "master" and any(
            isinstance(v, dict) and v.get("state") == "online" and v.get("lag", 99) <= 1
            for k, v in info.items() if k.startswith("slave"))

    def failover(self, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER``: the replica is promoted, the master demoted; returns the new master's port."""
        old = self.master_port()
        with self.sentinel(self.sentinels[0]) as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER)
        return self._wait_new_master(old, timeout)

    def kill_master(self, timeout: float = 20.0) -> int:
        """SIGKILL the master, as a crash; returns the port of the master the Sentinels elect."""
        old = self.master_port()
        self.servers[old].kill()
        return self._wait_new_master(old, timeout)

    def _wait_new_master(self, old: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port not in (None, old):
                with redis.Redis(port=port, socket_timeout=2) as client:
                    if client.info("replication")["role"] == "master":
                        return port
            time.sleep(0.1)
        raise RuntimeError(f"no new master after {old} within {timeout}s")

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.sentinel_procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in self.servers.values():
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
