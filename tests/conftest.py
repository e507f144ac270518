"""Shared fixtures: a real redis-server on a free port, and a real Plural sandbox process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

SLOW_MODULES = {
    "test_accounts", "test_beat", "test_chaos", "test_cli_accounts", "test_deploy_files", "test_health",
    "test_host_app", "test_imports", "test_inspect", "test_metrics", "test_monitoring", "test_namespace",
    "test_never_lose", "test_ops",
    "test_outcome_stream", "test_pipeline", "test_procfile", "test_redis_restart", "test_reporting", "test_ride_out",
    "test_run_local", "test_sentinel", "test_throttle", "test_tokens", "test_worker_loss",
}
"""Modules whose tests start Celery workers, beat, honcho, Sentinels or many command-line
processes, or build a wheel: ``make test-fast`` (``-m "not slow"``) leaves them out."""


ORDER = (
    # One module to start each of make test's six processes, the longest six:
    "test_chaos", "test_ride_out", "test_sentinel", "test_host_app", "test_redis_restart", "test_worker_loss",
    # xdist hands a process a second module as soon as its first has two tests or fewer to
    # run, which the chaos run (one test) has from the start: these take no time, so nothing
    # waits behind it for the two minutes it takes.
    "test_module_map", "test_sandbox_replies", "test_broker",
    # Then the rest, longest first, to whichever process is free (the docs build, about 10 s
    # of CPU, early among them).
    "test_accounts", "test_docs", "test_monitoring", "test_throttle", "test_health", "test_never_lose",
    "test_reporting", "test_beat", "test_cli_accounts",
    "test_outcome_stream", "test_pipeline",
    "test_ops", "test_inspect", "test_namespace", "test_deploy_files", "test_backlog", "test_sandbox",
    "test_sandbox_throttle", "test_run_local", "test_tokens", "test_replication", "test_settings", "test_imports",
    "test_ratelimit", "test_metrics", "test_sandbox_http", "test_plural_transport", "test_procfile", "test_breaker",
)
"""The order ``make test`` hands whole modules to its processes in (``--dist loadfile
--no-loadscope-reorder``), from their wall times in a full run (``--durations=0``); modules
not named come last. xdist's own order, by number of tests, started the chaos run last."""


def pytest_sessionfinish(session, exitstatus):
    """The worker and beat logs of a run that passed are removed; a run that failed keeps
    them, and its failures name them."""
    from tests.support import workers

    if exitstatus == 0:
        for path in workers.LOGS:
            path.unlink(missing_ok=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(ORDER)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free port for the whole session; yields its base URL."""
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server.base
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A flushed Redis database (0) for one test; modules of their own use 1-15 (``module_redis_url``)."""
    url = f"{redis_server}/0"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


_next_db = iter(range(1, 16))


@pytest.fixture(scope="module")
def module_redis_url(redis_server):
    """A flushed Redis database of its own for one test module (whose workers outlive single tests)."""
    db = next(_next_db, None)
    if db is None:
        pytest.fail("more than 15 modules asked for a Redis database of their own")
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="module")
def sandbox_process():
    """A real Plural sandbox process for one test module, accepting the test credentials."""
    from tests.support.sandbox import start_sandbox_process

    proc = start_sandbox_process(client_id="test-client", client_secret="test-secret-do-not-leak")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sentry():
    """A loopback Sentry (``tests.support.fake_sentry``) for one test module; ``.dsn`` points a
    worker's ``SENTRY_DSN`` at it."""
    from tests.support.fake_sentry import FakeSentry

    server = FakeSentry()
    yield server
    server.close()


@pytest.fixture
def services():
    """Processes a test started (workers, beats: anything with ``stop()``), stopped after it."""
    started = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def healthy_sandbox(sandbox_process):
    """The module's sandbox back to its start-up faults before and after a test."""
    sandbox_process.reset_faults()
    yield sandbox_process
    sandbox_process.reset_faults()


def use_settings(redis_url: str, plural_url: str | None = None, **overrides):
    """A new app (the producer side) for ``redis_url`` and these settings, to pass as ``app=``."""
    from plural_cancel.config.settings import Settings
    from plural_cancel.worker import create_app

    env = {"REDIS_URL": redis_url, "PLURAL_CLIENT_ID": "test-client",
           "PLURAL_CLIENT_SECRET": "test-secret-do-not-leak"}
    if plural_url:
        env["PLURAL_BASE_URL"] = plural_url
    env.update({k: str(v) for k, v in overrides.items()})
    return create_app(Settings.from_env(env))


def wait_for(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


FIGURES = "figures"
"""The name under which an end-to-end test records what it measured (``record_property``)."""


def pytest_terminal_summary(terminalreporter):
    """Print the figures tests recorded (``record_property(FIGURES, text)``) after the run,
    passed or failed: they reach this summary under ``-q`` and from xdist's workers too,
    where a test's own prints are not shown."""
    figures = [value for reports in terminalreporter.stats.values() for report in reports
               if getattr(report, "when", None) == "call"
               for name, value in getattr(report, "user_properties", ()) if name == FIGURES]
    if figures:
        terminalreporter.write_sep("-", "figures measured")
        for text in figures:
            terminalreporter.write_line(text)


# -- the Plural client's tests: a scripted HTTP server playing Plural --------------------

@pytest.fixture
def plural():
    """A real HTTP server on 127.0.0.1 playing Plural; each test scripts its answers."""
    from tests.support.scripted_plural import ScriptedPlural

    server = ScriptedPlural()
    yield server
    server.close()


@pytest.fixture
def store():
    from tests.support.scripted_plural import RecordingStore

    return RecordingStore()


@pytest.fixture
def client(plural, store):
    """A Plural client of ``plural`` holding its token in ``store``."""
    from plural_cancel.worker.plural import PluralClient
    from tests.support.scripted_plural import CLIENT_ID, NOW, SECRET

    with PluralClient(plural.base_url, CLIENT_ID, SECRET, tokens=store, clock=lambda: NOW,
                      read_timeout=5) as c:
        yield c
