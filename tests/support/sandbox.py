"""Start the Plural sandbox as a real process and drive its ``/_admin`` endpoints.

The tests and the worker talk to it over HTTP only, exactly as they would to Plural.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the sandbox runs with it as its working directory)."""

_READY = re.compile(r"sandbox listening on (http://\S+?):(\d+)/api")


class SandboxProcess:
    """A running ``python -m sandbox``; ``url`` is the API base to give a Plural client."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.base = f"{host}:{port}"
        self.url = f"{self.base}/api"
        """The API base, e.g. ``http://127.0.0.1:8800/api`` (``PLURAL_BASE_URL``)."""
        self.admin_url = f"{self.base}/_admin"
        self.log_path = log_path
        """The sandbox's stdout and stderr."""
        self._http = requests.Session()

    # -- admin -------------------------------------------------------------------------

    def _admin(self, method: str, path: str, **kw: Any) -> Any:
        response = self._http.request(method, self.admin_url + path, timeout=30, **kw)
        response.raise_for_status()
        return response.json()

    def set_faults(self, *, account: str | None = None, **faults: Any) -> dict[str, Any]:
        """Partial update (``latency_ms=200``, ``error_rates={"503": 0.5}``...); returns all.

        With ``account`` (a client id), that account's own faults, which override the global
        ones for its calls only (None as a value: that field follows the global one again);
        returns the faults in force for it.
        """
        return self._admin("PUT", _faults_path(account), json=faults)

    def reset_faults(self, account: str | None = None) -> dict[str, Any]:
        """Back to the faults the process started with, for every account, and no cancel
        counted against a limit; with ``account``, only that account's own faults and count."""
        return self._admin("DELETE", _faults_path(account))

    def faults(self, account: str | None = None) -> dict[str, Any]:
        """The global faults, or those in force for ``account``'s calls."""
        return self._admin("GET", _faults_path(account))

    def accounts(self) -> dict[str, Any]:
        """``{"accounts": [client ids], "faults": {client id: its own faults}}``; no client
        ids when any credentials are accepted."""
        return self._admin("GET", "/accounts")

    def token(self, client_id: str = "any-client", client_secret: str = "any-secret") -> str:
        """A fresh access token of account ``client_id`` (Generate Token must answer 200)."""
        response = self._http.post(self.url + "/auth/v1/token", timeout=30, json={
            "client_id": client_id, "client_secret": client_secret, "grant_type": "client_credentials"})
        response.raise_for_status()
        return response.json()["access_token"]

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """Logged /api requests with ``seq`` above ``since``, oldest first."""
        return self._admin("GET", "/requests", params={"since": since})["requests"]

    def clear_requests(self) -> None:
        self._admin("DELETE", "/requests")

    def create_links(self, count: int = 1, status: str = "CREATED",
                     prefix: str | None = "pl-test-") -> list[str]:
        """Create ``count`` fully populated links; ids are ``<prefix><n:06d>``."""
        body: dict[str, Any] = {"count": count, "status": status}
        if prefix is not None:
            body["prefix"] = prefix
        return self._admin("POST", "/links", json=body)["ids"]

    def create_link(self, link_id: str, status: str = "CREATED") -> str:
        return self._admin("POST", "/links", json={"id": link_id, "status": status})["ids"][0]

    def link(self, link_id: str) -> dict[str, Any]:
        """The link with ``cancel_count`` (200 cancels) and ``cancel_attempts`` (every PUT)."""
        return self._admin("GET", f"/links/{link_id}")

    def set_link_status(self, link_id: str, status: str) -> dict[str, Any]:
        return self._admin("PUT", f"/links/{link_id}", json={"status": status})

    def revoke_tokens(self) -> int:
        """Every token issued so far answers 401 from now on; returns how many there were."""
        return self._admin("POST", "/revoke-tokens")["revoked"]

    def issued_tokens(self) -> list[str]:
        """Every access token the sandbox has issued, revoked and expired ones included."""
        return self._admin("GET", "/tokens")["tokens"]

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/stats")

    def reset(self, demo: bool = True) -> None:
        """Back to start-up state: demo links only, empty log, start-up faults, no tokens."""
        self._admin("POST", "/reset", json={"demo": demo})

    # -- lifetime ----------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILL if it does not stop in time)."""
        self._http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        status = self.proc.wait(timeout)
        if status == 0:  # a clean stop leaves nothing worth reading
            self.log_path.unlink(missing_ok=True)
        return status

    def kill(self) -> int:
        """SIGKILL: the sandbox vanishes mid-whatever, as a crashed Plural would."""
        self._http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        status = self.proc.wait(10)
        self.log_path.unlink(missing_ok=True)
        return status

    def __enter__(self) -> "SandboxProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _faults_path(account: str | None) -> str:
    return "/faults" if account is None else f"/accounts/{quote(account, safe='')}/faults"


THROTTLE_FAULTS = ("limit", "throttle", "plural_throttle")
"""The request log's ``fault`` for a throttle: ``limit_rps``, ``throttle_rate``,
``plural_throttle_rate`` (an ``error_rates`` 429 logs ``429``)."""


def is_throttle(entry: Mapping[str, Any]) -> bool:
    """True for a logged call answered as a throttle: any 429, or Plural's 400 ``PAYMENT_RATE_LIMIT``."""
    return entry["status"] == 429 or entry["fault"] in THROTTLE_FAULTS


def throttles_per_second(entries: Iterable[Mapping[str, Any]], *,
                         account: str | None = None) -> dict[int, tuple[int, int]]:
    """Whole second of arrival (epoch) -> (cancels, of which throttled), over the logged
    cancel PUTs (of ``account`` only, when given), for the share of throttles a second."""
    seconds: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for entry in entries:
        if entry["method"] != "PUT" or not entry["path"].endswith("/cancel"):
            continue
        if account is not None and entry.get("account") != account:
            continue
        counts = seconds[int(entry["timestamp"])]
        counts[0] += 1
        counts[1] += is_throttle(entry)
    return {second: (sent, throttled) for second, (sent, throttled) in sorted(seconds.items())}


def start_sandbox_process(port: int | None = None, *, client_id: str | None = None,
                          client_secret: str | None = None, accounts: Iterable[tuple[str, str]] = (),
                          extra_args: Iterable[str] = (),
                          timeout: float = 15.0, command: Sequence[str] | None = None,
                          env: Mapping[str, str] | None = None) -> SandboxProcess:
    """Start ``python -m sandbox`` and return once it listens.

    ``port=None`` lets the sandbox pick a free port (read it from ``.port``). The
    credentials (``client_id``/``client_secret``, and each ``(client id, secret)`` of
    ``accounts``: one Plural account each) are passed on the command line; without any,
    any are accepted, whatever ``PLURAL_CLIENT_ID``/``PLURAL_CLIENT_SECRET`` say in this
    environment (the command would take them from there), unless ``env`` sets them.
    ``command`` replaces ``python -m sandbox`` (``plural-cancel sandbox``, the benchmark's
    legacy server); it must take the same options and print the same line once it listens.
    """
    args = list(command or [sys.executable, "-m", "sandbox"])
    args += ["--port", str(port if port is not None else 0)]
    if client_id is not None or client_secret is not None:
        args += ["--client-id", client_id or "", "--client-secret", client_secret or ""]
    for account, secret in accounts:
        args += ["--account", f"{account}:{secret}"]
    args += list(extra_args)
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("PLURAL_CLIENT_ID", "PLURAL_CLIENT_SECRET")}, **(env or {})}
    fd, name = tempfile.mkstemp(prefix="plural-sandbox-", suffix=".log")
    log_path = Path(name)
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _READY.search(log_path.read_text(errors="replace"))
        if match:
            return SandboxProcess(proc, match.group(1), int(match.group(2)), log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    raise RuntimeError(f"sandbox did not start (exit status {proc.returncode}):\n"
                       + log_path.read_text(errors="replace")[-2000:])
