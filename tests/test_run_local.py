"""``make run`` (``scripts/run-local.sh``) prints the environment a second terminal needs.

The real script runs, unchanged, with nothing set: it starts its own redis-server, the
sandbox, a worker and beat. It runs from a scratch copy of the repository's layout (its
``scripts/`` and a ``.venv`` link), so that its ``var/redis`` is the test's own and never a
developer's. Then, in an environment made of the printed ``export`` lines alone, the
commands the printout suggests must work: ``check`` passes, and a cancel enqueued there is
carried out by the script's worker.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
END_OF_PRINTOUT = "Ctrl-C stops everything."


@pytest.fixture
def make_run(tmp_path):
    """``bash scripts/run-local.sh`` as ``make run`` runs it, in its own process group; yields
    (the process, its printout up to the end of the message)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "run-local.sh", tmp_path / "scripts" / "run-local.sh")
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SANDBOX_PORT": str(free_port()),
           # this checkout's code (its .venv may be shared with another checkout)
           "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(["bash", str(tmp_path / "scripts" / "run-local.sh")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    printout = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            printout.append(line.rstrip("\n"))
            if END_OF_PRINTOUT in line:
                break
        assert printout and END_OF_PRINTOUT in printout[-1], (
            "\n".join(printout) + "\n" + (tmp_path / "run.log").read_text(errors="replace")[-3000:])
        yield proc, printout
    finally:
        # Ctrl-C: SIGINT to the whole foreground process group, as a terminal sends it.
        stopping = time.monotonic()
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            pytest.fail("make run did not stop within 60 s of Ctrl-C:\n"
                        + (tmp_path / "run.log").read_text(errors="replace")[-3000:])
        finally:
            log.close()
        print(f"[make run] stopped {time.monotonic() - stopping:.1f} s after Ctrl-C")


def exports(printout: list[str]) -> dict[str, str]:
    """The printout's ``export NAME=value`` lines, read as a shell reads them."""
    found = {}
    for line in printout:
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for word in words[1:]:
                name, _, value = word.partition("=")
                found[name] = value
    return found


def test_make_run_prints_every_variable_a_second_terminal_needs(make_run):
    proc, printout = make_run
    exported = exports(printout)
    assert {"REDIS_URL", "PLURAL_BASE_URL", "PLURAL_CLIENT_ID", "PLURAL_CLIENT_SECRET"} <= set(exported), printout

    # A second terminal: the printed lines and nothing else (PATH to find the tools; PYTHONPATH
    # for this checkout's code).
    second = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **exported}
    cli = str(VENV_BIN / "plural-cancel")
    check = subprocess.run([cli, "check"], env=second, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    settings_line, redis_line, clock_line, plural_line = check.stdout.splitlines()
    assert settings_line == "settings   ok" and plural_line.startswith("token default: ok (client id ")
    assert redis_line.startswith("redis      ok (round trip ") and clock_line.startswith("clock      ok (")

    enqueue = subprocess.run([cli, "enqueue", "pl-demo-created-01"], env=second, capture_output=True, text=True,
                             timeout=60)
    assert enqueue.returncode == 0, enqueue.stderr
    request_id = enqueue.stdout.strip()

    def succeeded():
        status = subprocess.run([cli, "status", request_id, "--json"], env=second, capture_output=True, text=True,
                                timeout=60)
        return status.returncode == 0 and '"succeeded"' in status.stdout

    wait_for(succeeded, 60, 0.5, message="the demo cancel succeeded")
    assert proc.poll() is None
