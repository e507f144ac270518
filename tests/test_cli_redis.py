"""``plural-cancel`` when Redis is away or refuses writes: one line on stderr, exit status 1.

Each command runs its console script's ``main`` in this process (``tests/support/cli.py``);
the last test runs some of them as processes of their own too and expects the same bytes.
Redis is real: a port where nothing listens, or a redis-server of its own that is made to
refuse writes (``maxmemory`` below its use: OOM; a replica of a master that is not there:
READONLY).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import redis

from tests.support import cli
from tests.support.redis_server import RedisServer, free_port
from tests.support.workers import ROOT

PASSWORD = "s3cret-redis-pw"


def cli_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLURAL_", "SENTRY_", "CANCEL_"))}
    env.update(REDIS_URL=redis_url, PLURAL_CLIENT_ID="test-client", PLURAL_CLIENT_SECRET="test-secret-do-not-leak")
    return env


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return cli.run(cli_env(redis_url), *args)


@pytest.fixture(scope="module")
def link_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bulk") / "links.txt"
    path.write_text("pl-down-1\npl-down-2\npl-down-3\n")
    return str(path)


COMMANDS = [
    ("enqueue", "pl-down-1"),
    ("enqueue", "pl-down-1", "--request-id", "order-1-expiry"),
    ("status", "order-1-expiry"),
    ("status", "order-1-expiry", "--json"),
    ("bulk", "{file}"),
    ("schedule", "pl-down-1", "--at", "2031-01-01T00:00:00Z"),
    ("unschedule", "pl-down-1"),
    ("failed", "list"),
    ("failed", "list", "--json"),
    ("failed", "retry", "order-1-expiry"),
    ("failed", "retry", "--all"),
    ("stats",),
    ("stats", "--json"),
    ("check",),
]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_command_without_redis_says_so_in_one_line(args, link_file):
    port = free_port()  # nothing listens there
    url = f"redis://operator:{PASSWORD}@127.0.0.1:{port}/0"
    result = run_cli(url, *(a.format(file=link_file) for a in args))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    if args[0] != "check":  # check reports Redis on its own line of a report
        assert lines[0].startswith(f"plural-cancel: cannot reach Redis at redis://operator:***@127.0.0.1:{port}/0: ")
        assert "Connection refused" in lines[0]


def test_a_password_in_the_query_is_never_shown_either():
    """redis-py reads a password from the query too, but kombu (the broker) fails on that URL when
    it connects: the settings refuse it, without repeating it."""
    result = run_cli(f"redis://127.0.0.1:{free_port()}/0?socket_timeout=5&password={PASSWORD}", "status", "some-id")
    assert result.returncode == 2 and PASSWORD not in result.stderr
    assert result.stderr == ("plural-cancel: configuration error: REDIS_URL: must be a URL whose query holds only a "
                             "rediss:// URL's ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile, "
                             "ssl_check_hostname (the broker, kombu, takes no others)\n")


@pytest.fixture
def refusing_redis():
    """A redis-server of this test's own, to be made to refuse writes; yields (server, client)."""
    server = RedisServer(prefix="pc-redis-refusing-")
    client = redis.Redis.from_url(server.url)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


WRITES = [("enqueue", "pl-full-1"), ("bulk", "{file}")]
# Not schedule under OOM: its script deletes first, and Redis lets a script that has
# written go on writing past maxmemory (so that it stays atomic). A replica refuses it.
READ_ONLY_WRITES = [*WRITES, ("schedule", "pl-full-1", "--at", "2031-01-01T00:00:00Z")]


def test_a_redis_that_refuses_writes_is_one_line_too(refusing_redis, link_file):
    server, client = refusing_redis
    client.config_set("maxmemory", "1")  # already above it: every write is refused (noeviction)
    for args in WRITES:
        result = run_cli(server.url, *(a.format(file=link_file) for a in args))
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"plural-cancel: Redis at {server.url} refused the write: OOM command not allowed"), line

    client.config_set("maxmemory", "0")
    client.replicaof("127.0.0.1", free_port())  # a replica of nothing: read-only, reads still answered
    for args in READ_ONLY_WRITES:
        result = run_cli(server.url, *(a.format(file=link_file) for a in args))
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"plural-cancel: Redis at {server.url} refused the write: "), line
        assert "read only replica" in line
    assert run_cli(server.url, "status", "no-such-request").stderr.strip() == (
        "plural-cancel: no cancel with request_id 'no-such-request' (unknown, or expired after RESULT_TTL)")


@pytest.mark.parametrize("args", [("enqueue", "pl-down-1"), ("failed", "list", "--json"), ("stats",)], ids=" ".join)
def test_the_console_script_says_what_the_command_says_here(args):
    """The in-process runs above stand for the console script: the same exit status and the
    same bytes on stdout and stderr, Redis away."""
    url = f"redis://operator:{PASSWORD}@127.0.0.1:{free_port()}/0"
    here = run_cli(url, *args)
    alone = cli.run_process(cli_env(url), *args, cwd=ROOT)
    assert (alone.returncode, alone.stdout, alone.stderr) == (here.returncode, here.stdout, here.stderr)
    assert here.returncode == 1 and here.stderr.startswith("plural-cancel: cannot reach Redis at ")


def test_a_warning_logged_during_a_run_here_reaches_its_stderr_as_in_a_process():
    """Python prints an unconfigured process's warnings on stderr (``logging.lastResort``);
    runs here must show them too, or the one-line tests above could not see a stray one."""
    import logging

    import click

    from plural_cancel.cli import cli as group

    @click.command(name="warns")
    def warns():
        logging.getLogger("kombu.connection").warning("No hostname was supplied. Reverting to default")
        logging.getLogger("kombu.connection").info("not shown: below WARNING")

    group.add_command(warns)
    try:
        result = cli.run(dict(os.environ), "warns")
    finally:
        del group.commands["warns"]
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == "No hostname was supplied. Reverting to default\n"


@pytest.mark.parametrize("args", [("stats",), ("enqueue", "pl-down-1"), ("check",)], ids=" ".join)
def test_unreachable_sentinels_are_one_short_line_naming_redis_sentinels(args):
    """Under Sentinel, REDIS_URL's host is not used: the line names the Sentinels and the master,
    not that host, and not redis-py's text (every Sentinel client's repr, 1,264 characters here)."""
    first, second = free_port(), free_port()  # nothing listens there
    env = {**cli_env(f"redis://operator:{PASSWORD}@10.255.0.1:6390/0"),
           "REDIS_SENTINELS": f"127.0.0.1:{first},127.0.0.1:{second}", "REDIS_SENTINEL_MASTER": "mymaster"}
    result = cli.run(env, *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    said = (f"none of the Sentinels in REDIS_SENTINELS (127.0.0.1:{first}, 127.0.0.1:{second}) answered "
            f"(Connection refused): no master 'mymaster' (REDIS_SENTINEL_MASTER) found")
    head = "plural-cancel: redis      unreachable: " if args[0] == "check" else "plural-cancel: cannot reach Redis: "
    assert line == head + said
    assert "10.255.0.1" not in line and PASSWORD not in line
