"""The ``Procfile`` as a Procfile runner runs it: ``honcho start``, unchanged, against a real
Redis and the sandbox, must carry a cancel to its end and stop with every process it started.

``tests/test_deploy_files.py`` proves each line names a real entry point; this proves the
lines together run the product (the environment reaches them through the runner's ``-e``
file, the worker and beat share one Redis, a stop leaves nothing behind).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import use_settings, wait_for
from tests.support.redis_server import RedisServer
from tests.support.sandbox import start_sandbox_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLIENT_ID, CLIENT_SECRET = "procfile-client", "procfile-secret"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux ``/proc``)."""
    found, stack = set(), [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except FileNotFoundError:
                continue
            stack.extend(children - found)
            found |= children
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to read its status."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def redis_aof():
    server = RedisServer(aof=True)  # as deployed
    yield server
    server.stop()


@pytest.fixture
def sandbox():
    proc = start_sandbox_process(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    yield proc
    proc.stop()


def test_honcho_runs_the_procfile_a_cancel_succeeds_and_a_stop_leaves_no_process(tmp_path, redis_aof, sandbox):
    env_file = tmp_path / "procfile.env"
    env_file.write_text("\n".join([
        f"REDIS_URL={redis_aof.url}",
        f"PLURAL_BASE_URL={sandbox.url}",
        f"PLURAL_CLIENT_ID={CLIENT_ID}",
        f"PLURAL_CLIENT_SECRET={CLIENT_SECRET}",
        f"HEALTH_DIR={tmp_path}",  # its own heartbeat files, never another test's
        "PYTHONUNBUFFERED=1",
    ]) + "\n")
    # The runner's own environment: only what a shell that runs `honcho start` has (PATH
    # finds celery as an installed project puts it there), and this checkout's code.
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "honcho.log"
    log = open(log_path, "wb")
    honcho = subprocess.Popen([str(VENV_BIN / "honcho"), "start", "--no-colour", "-f", str(ROOT / "Procfile"),
                               "-d", str(ROOT), "-e", str(env_file)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    children: set[int] = set()
    try:
        wait_for(lambda: "ready." in output() and "beat: Starting" in output(), 60,
                 message="the Procfile's worker ready and beat started")
        children = descendants(honcho.pid)
        assert len(children) >= 4, children  # a shell and celery for each of worker and beat

        from plural_cancel.tasks import enqueue_cancel, get_status

        app = use_settings(redis_aof.url, sandbox.url)
        link_id = sandbox.create_links(1, prefix="pl-procfile-")[0]
        request_id = enqueue_cancel(link_id, app=app)
        status = wait_for(lambda: (s := get_status(request_id, app=app)) and s["state"] in ("succeeded", "failed")
                          and s, 30, message="the cancel's end")
        assert (status["state"], status["outcome"]) == ("succeeded", "cancelled"), status
        assert sandbox.link(link_id)["cancel_count"] == 1
    except BaseException:
        print(output()[-5000:])
        raise
    finally:
        # Ctrl-C in the terminal that runs honcho: SIGINT to its process group. honcho
        # passes SIGTERM on to each process's own group (the worker's soft shutdown).
        stopping = time.monotonic()
        os.killpg(honcho.pid, signal.SIGINT)
        try:
            honcho.wait(30)
        except subprocess.TimeoutExpired:
            for pid in [honcho.pid, *descendants(honcho.pid)]:
                os.kill(pid, signal.SIGKILL)
            honcho.wait(10)
            pytest.fail(f"honcho did not stop within 30 s:\n{output()[-3000:]}")
        finally:
            log.close()
        took = time.monotonic() - stopping
    text = output()
    assert honcho.returncode is not None
    wait_for(lambda: not [pid for pid in children if alive(pid)], 5, message="every process honcho started gone")
    # An idle worker stops by itself on SIGTERM, well inside honcho's 5 s before SIGKILL.
    assert "SIGKILL" not in text and took < 5, (took, text[-3000:])
    for name in ("worker.1", "beat.1"):
        assert f"{name} stopped" in text, text[-3000:]
