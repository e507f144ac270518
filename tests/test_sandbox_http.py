"""The sandbox's HTTP layer (aiohttp) and its one command, over real sockets and processes.

What a client meets below Plural's shapes: a reset that is a TCP RST, ``Expect:
100-continue``, an oversized body, a stop while an answer is held; and ``python -m
sandbox`` and ``plural-cancel sandbox`` being one command.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from plural_cancel.sandbox import SandboxServer
from tests.support.sandbox import start_sandbox_process

ROOT = Path(__file__).resolve().parent.parent
PLURAL_CANCEL = str(Path(sys.executable).with_name("plural-cancel"))
CREDENTIALS = {"client_id": "env-id", "client_secret": "env-secret", "grant_type": "client_credentials"}


@pytest.fixture(scope="module")
def server():
    with SandboxServer(seed_demo=True) as srv:
        yield srv


@pytest.fixture
def sandbox(server):
    server.app.faults.reset()
    yield server
    server.app.faults.reset()


def recv_until(sock: socket.socket, marker: bytes, limit: float = 5) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while marker not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_reset_fault_is_a_tcp_rst_not_a_close(sandbox):
    sandbox.set_faults(reset_rate=1.0)
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(b"GET /api/pay/v1/paymentlink/pl-demo-created-01 HTTP/1.1\r\nHost: x\r\n"
                     b"Request-ID: rst-1\r\n\r\n")
        # A FIN would read as b"" (http.client: RemoteDisconnected); only an RST raises here.
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    entry = sandbox.log.since(0)[-1]
    assert (entry["request_id"], entry["status"], entry["fault"]) == ("rst-1", None, "reset")


def test_expect_100_continue_gets_its_interim_answer_then_the_real_one(sandbox):
    body = json.dumps({"latency_ms": 0, "retry_after": 3}).encode()
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(b"PUT /_admin/faults HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert recv_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = recv_until(sock, b'"retry_after":3')
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Server: plural-sandbox\r\n" in answer
    assert sandbox.app.faults.current.retry_after == 3


def test_an_oversized_body_is_413_in_plurals_shape(sandbox):
    response = requests.post(sandbox.admin_url + "/links", data=b"x" * (2 * 1024 * 1024),
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 413
    assert response.json()["code"] == "INVALID_REQUEST"


def test_a_stop_drops_a_held_answer_and_exits_0_at_once():
    proc = start_sandbox_process(extra_args=["--no-demo-links"])
    stopped = False
    try:
        [link_id] = proc.create_links(1, prefix="pl-hold-")
        token = requests.post(proc.url + "/auth/v1/token", timeout=5, json=CREDENTIALS).json()["access_token"]
        proc.set_faults(timeout_rate=1.0, hang_ms=60000)
        outcome: list = []

        def held_cancel() -> None:
            try:
                outcome.append(requests.put(f"{proc.url}/pay/v1/paymentlink/{link_id}/cancel", timeout=30,
                                            headers={"Authorization": f"Bearer {token}", "Request-ID": "held"}))
            except requests.RequestException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=held_cancel)
        caller.start()
        deadline = time.monotonic() + 5
        while not any(e["request_id"] == "held" for e in proc.requests()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.link(link_id)["status"] == "CANCELLED"  # applied on arrival, answer held
        started = time.monotonic()
        assert proc.stop(timeout=20) == 0  # SIGKILL (and -9) had it waited out the 60 s hang
        stopped = True
        assert time.monotonic() - started < 15
        caller.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], requests.ConnectionError)
    finally:
        if not stopped:
            proc.kill()


def test_python_m_sandbox_and_plural_cancel_sandbox_are_one_command():
    from plural_cancel.cli import cli
    from plural_cancel.sandbox.cli import sandbox

    assert cli.get_command(None, "sandbox") is sandbox
    helps = [subprocess.run(argv + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
             for argv in ([sys.executable, "-m", "sandbox"], [PLURAL_CANCEL, "sandbox"])]
    assert [h.returncode for h in helps] == [0, 0], [h.stderr for h in helps]
    first, second = (h.stdout.split("\n", 1)[1] for h in helps)  # the usage line names the program
    assert first == second and "--no-demo-links" in first and "8800" in first


def test_plural_cancel_sandbox_takes_the_credentials_from_the_environment():
    proc = start_sandbox_process(command=[PLURAL_CANCEL, "sandbox"],
                                 env={"PLURAL_CLIENT_ID": "env-id", "PLURAL_CLIENT_SECRET": "env-secret"})
    try:
        wrong = dict(CREDENTIALS, client_secret="guess")
        assert requests.post(proc.url + "/auth/v1/token", json=wrong, timeout=5).status_code == 422
        assert requests.post(proc.url + "/auth/v1/token", json=CREDENTIALS, timeout=5).status_code == 200
    finally:
        assert proc.stop() == 0


def test_half_a_credential_pair_is_refused():
    result = subprocess.run([sys.executable, "-m", "sandbox", "--port", "0", "--client-id", "only"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PLURAL_")})
    assert result.returncode == 2 and "--client-secret" in result.stderr


def test_without_aiohttp_only_the_sandbox_fails_and_names_the_extra():
    # aiohttp made unimportable: the other commands' imports never reach it, the sandbox says what to install.
    script = ("import sys; sys.modules['aiohttp'] = None\n"
              "import plural_cancel.cli, plural_cancel.sandbox\n"
              "from plural_cancel.sandbox.cli import main\n"
              "raise SystemExit(main(['--port', '0']))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "pip install 'plural-cancel[sandbox]'" in result.stderr


def test_a_port_in_use_is_one_line_and_exit_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "sandbox", "--port", str(port)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr

