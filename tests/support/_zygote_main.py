"""The zygote process (``tests/support/zygote.py``): the libraries a ``celery`` process loads,
loaded once, then one fork per process asked for.

Protocol, one JSON object or line per message. In, on stdin: ``{"argv", "env", "cwd",
"log"}``. Out, on stdout: ``spawned PID`` for each request, in order, and ``exited PID
STATUS`` when a child ends (STATUS as ``subprocess`` gives it: negative for a signal).
The zygote runs no thread (a fork copies only the forking one), and ends at EOF.

A child leaves the loop and becomes the process asked for: its own session and process
group, stdin from /dev/null, stdout and stderr on the log, the environment, directory and
``sys.argv`` of the request, then the console script's ``celery.__main__.main`` and an
ordinary interpreter exit (atexit handlers, non-daemon threads joined, streams flushed).
"""

import importlib
import json
import os
import select
import sys
import threading

PRELOAD = ("celery.__main__", "celery.bin.celery", "celery.apps.worker", "celery.apps.beat",
           "celery.concurrency.thread", "celery.worker.consumer", "celery.worker.strategy",
           "kombu.transport.redis", "redis", "requests", "sentry_sdk", "redbeat", "prometheus_client")
"""What every celery process of ours loads, none of it ours: the product's modules read
settings and are the code under test, so each child imports them fresh."""

for name in PRELOAD:
    importlib.import_module(name)

assert threading.active_count() == 1, "the zygote must not run threads: a fork would lose them"

children = set()


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def reap():
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        say(f"exited {pid} {os.waitstatus_to_exitcode(status)}")


def serve():
    """Fork for each request; returns only in a child, with its request. Reads fd 0 itself:
    a buffered ``sys.stdin`` could hold a request that ``select`` then never reports."""
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        reap()
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            sys.exit(0)  # the test process has gone: its children are its fixtures' to stop
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                children.clear()
                return request
            children.add(pid)
            say(f"spawned {pid}")


request = serve()

# -- the child ---------------------------------------------------------------------------
os.setsid()
log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
os.dup2(log, 1)
os.dup2(log, 2)
os.close(log)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
sys.stdin = open(os.devnull)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
sys.argv = request["argv"]
sys.path[0] = os.path.dirname(request["argv"][0])  # as the console script has it
sys.exit(sys.modules["celery.__main__"].main())
