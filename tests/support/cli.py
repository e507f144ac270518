"""``plural-cancel`` run inside the test process, as its console script runs it.

A run of the console script is a new interpreter loading Celery, kombu, redis-py and
requests before the command does anything, which the operator's commands tests paid for
every command (docs/development.md, "Why the suite takes what it takes"). :func:`run` calls the same ``main`` the
console script calls, with ``os.environ``, ``sys.stdin``, ``sys.stdout`` and ``sys.stderr``
swapped for the run (click's ``CliRunner.isolation``), and returns what
``subprocess.run`` would have. ``test_cli_redis`` runs commands both ways and checks that
the two answers are the same, byte for byte.

What a subprocess would show and this must too: Python's logging prints WARNING and above
on stderr when nothing configured it (``logging.lastResort``), and a command's stray
warning line is a defect the one-line error tests must catch. Under pytest the root
logger has pytest's capturing handler instead, so a run here puts a handler of that kind
on stderr for its duration.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from click.testing import CliRunner

PLURAL_CANCEL = str(Path(sys.executable).with_name("plural-cancel"))
"""The console script, for the tests that run it as a process of its own."""


def run(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess:
    """``plural-cancel ARGS`` with exactly ``env`` as its environment; never raises for an
    exit status (an exception the command lets out fails the test, as a traceback would)."""
    from plural_cancel.cli import main

    changes: dict[str, str | None] = {name: None for name in os.environ if name not in env}
    changes.update(env)
    with CliRunner().isolation(env=changes) as (out, err, _):
        stderr = logging.StreamHandler(sys.stderr)  # the isolated stream
        stderr.setLevel(logging.WARNING)
        logging.getLogger().addHandler(stderr)
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            logging.getLogger().removeHandler(stderr)
            sys.stdout.flush()
            sys.stderr.flush()
        return subprocess.CompletedProcess([PLURAL_CANCEL, *args], code,
                                           out.getvalue().decode(), err.getvalue().decode())


def run_process(env: Mapping[str, str], *args: str, cwd: Path | str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """``plural-cancel ARGS`` as the operator runs it: the console script, a process of its own."""
    return subprocess.run([PLURAL_CANCEL, *args], cwd=cwd, env=dict(env), capture_output=True, text=True,
                          timeout=timeout)
