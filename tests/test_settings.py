"""Settings: read once, validated, secrets masked."""

import subprocess
import sys

import pytest

from plural_cancel.config.settings import PLURAL_BASES, VARIABLES, Settings, exports
from plural_cancel.errors import ConfigError
from tests.support.workers import ROOT


def test_defaults_follow_the_contract():
    s = Settings.from_env({})
    assert s.plural_env == "uat"
    assert s.plural_base_url == PLURAL_BASES["uat"] == "https://pluraluat.v2.pinepg.in/api"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.rate_limit, s.rate_burst, s.retry_budget, s.result_ttl) == (10.0, 0, 86400.0, 604800)
    assert s.client_id is None and s.client_secret is None and s.sentry_dsn is None


def test_the_shutdown_grace_is_celerys_soft_shutdown_timeout():
    from plural_cancel.config.celery import celery_config

    assert celery_config(Settings.from_env({}))["worker_soft_shutdown_timeout"] == 15.0
    settings = Settings.from_env({"WORKER_SHUTDOWN_GRACE": "2.5"})
    assert celery_config(settings)["worker_soft_shutdown_timeout"] == 2.5
    assert celery_config(settings)["worker_pool"] == "plural_cancel.worker.pool:TaskPool"


def test_cancels_travel_on_a_queue_of_their_own():
    """CANCEL_QUEUE (``plural-cancel``): the default queue, the only one declared (so the only
    one a worker consumes), and the remote-control exchange; never Celery's ``celery``."""
    from plural_cancel.config.celery import celery_config

    config = celery_config(Settings.from_env({}))
    assert config["task_default_queue"] == "plural-cancel"
    assert [q.name for q in config["task_queues"]] == ["plural-cancel"] and not config["task_create_missing_queues"]
    assert config["control_exchange"] == "plural-cancel"
    assert "global_keyprefix" not in config["broker_transport_options"]  # send_task by name finds the plain list
    named = celery_config(Settings.from_env({"CANCEL_QUEUE": "payments.cancel"}))
    assert named["task_default_queue"] == "payments.cancel"
    for bad in ("celery", "has space", "x" * 101, "-dash-first", "q/1"):
        with pytest.raises(ConfigError, match="CANCEL_QUEUE"):
            Settings.from_env({"CANCEL_QUEUE": bad})


def test_the_proxy_and_ca_bundle_come_from_the_usual_variables():
    assert Settings.from_env({}).plural_proxy is None
    s = Settings.from_env({"HTTPS_PROXY": "http://user:pw@proxy.internal:3128", "REQUESTS_CA_BUNDLE": "/etc/ca.pem"})
    assert (s.plural_proxy, s.ca_bundle) == ("http://user:pw@proxy.internal:3128", "/etc/ca.pem")
    assert "pw" not in s.describe()["plural_proxy"]
    assert Settings.from_env({"https_proxy": "http://p:1", "NO_PROXY": ".pinepg.in"}).plural_proxy is None
    # An http base URL (loopback only) takes HTTP_PROXY, not HTTPS_PROXY.
    s = Settings.from_env({"PLURAL_BASE_URL": "http://127.0.0.1:8800/api", "HTTPS_PROXY": "http://p:1",
                           "HTTP_PROXY": "http://q:2"})
    assert s.plural_proxy == "http://q:2"


@pytest.mark.parametrize("no_proxy, base, bypassed", [
    (".pinepg.in", "https://pluraluat.v2.pinepg.in/api", True),
    ("pinepg.in", "https://pluraluat.v2.pinepg.in/api", True),
    ("other.example, pluraluat.v2.pinepg.in", "https://pluraluat.v2.pinepg.in/api", True),
    ("pluraluat.v2.pinepg.in:443", "https://pluraluat.v2.pinepg.in:443/api", True),
    ("10.0.0.0/8", "https://10.20.30.40/api", True),   # a CIDR block, as requests reads NO_PROXY
    ("10.0.0.0/8", "https://11.20.30.40/api", False),
    ("*", "https://api.pluralpay.in/api", True),
    ("example.com", "https://api.pluralpay.in/api", False),
])
def test_no_proxy_is_read_as_requests_reads_it(no_proxy, base, bypassed):
    s = Settings.from_env({"PLURAL_BASE_URL": base, "HTTPS_PROXY": "http://p:1", "NO_PROXY": no_proxy})
    assert s.plural_proxy == (None if bypassed else "http://p:1")


def test_the_proxy_password_never_shows():
    s = Settings.from_env({"HTTPS_PROXY": "http://user:pr0xy-pw@proxy.internal:3128",
                           "REDIS_URL": "redis://:redispass@host:6379/0"})
    assert s.plural_proxy == "http://user:pr0xy-pw@proxy.internal:3128"  # the client needs it whole
    for text in (repr(s), str(s), str(s.describe())):
        assert "pr0xy-pw" not in text and "redispass" not in text
    assert "user:***@proxy.internal:3128" in repr(s)


@pytest.mark.parametrize("base", [
    "http://127.0.0.1:8800/api", "http://127.9.8.7/api", "http://[::1]:8800/api", "http://localhost:8800/api",
    "http://LOCALHOST/api", "https://sandbox:8800/api", "https://10.1.2.3/api",
])
@pytest.mark.parametrize("env", ["uat", "prod"])
def test_plain_http_is_for_loopback_only(base, env):
    assert Settings.from_env({"PLURAL_ENV": env, "PLURAL_BASE_URL": base}).plural_base_url == base


@pytest.mark.parametrize("base", [
    "http://sandbox:8800/api", "http://10.1.2.3/api", "http://pluraluat.v2.pinepg.in/api",
    "http://localhost.example.com/api", "http://128.0.0.1/api", "http://[::2]/api",
])
@pytest.mark.parametrize("env", ["uat", "prod"])
def test_plain_http_to_another_host_is_refused(base, env):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PLURAL_ENV": env, "PLURAL_BASE_URL": base})
    assert info.value.variable == "PLURAL_BASE_URL"
    assert str(info.value).startswith("PLURAL_BASE_URL: must be ") and "\n" not in str(info.value)
    assert "https" in str(info.value) and "loopback" in str(info.value)


def test_prod_picks_the_production_base():
    assert Settings.from_env({"PLURAL_ENV": "PROD"}).plural_base_url == "https://api.pluralpay.in/api"


@pytest.mark.parametrize("env, variable", [
    ({"PLURAL_ENV": "staging"}, "PLURAL_ENV"),
    ({"PLURAL_BASE_URL": "ftp://x/api"}, "PLURAL_BASE_URL"),
    ({"PLURAL_BASE_URL": "not a url"}, "PLURAL_BASE_URL"),
    ({"PLURAL_ENV": "prod", "PLURAL_BASE_URL": "http://proxy.local/api"}, "PLURAL_BASE_URL"),
    ({"PLURAL_RATE_LIMIT": "0"}, "PLURAL_RATE_LIMIT"),
    ({"PLURAL_RATE_LIMIT": "-3"}, "PLURAL_RATE_LIMIT"),
    ({"PLURAL_RATE_LIMIT": "fast"}, "PLURAL_RATE_LIMIT"),
    ({"PLURAL_RATE_LIMIT": "nan"}, "PLURAL_RATE_LIMIT"),
    ({"PLURAL_RATE_BURST": "-1"}, "PLURAL_RATE_BURST"),
    ({"PLURAL_RATE_BURST": "1.5"}, "PLURAL_RATE_BURST"),
    ({"CANCEL_RETRY_BUDGET": "0"}, "CANCEL_RETRY_BUDGET"),
    ({"RESULT_TTL": "forever"}, "RESULT_TTL"),
    ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
    ({"SENTRY_DSN": "not-a-dsn"}, "SENTRY_DSN"),
    ({"WORKER_SHUTDOWN_GRACE": "-1"}, "WORKER_SHUTDOWN_GRACE"),
    ({"BREAKER_MIN_LINKS": "1"}, "BREAKER_MIN_LINKS"),  # one link must never be enough
    ({"BREAKER_FAILURE_RATE": "1.5"}, "BREAKER_FAILURE_RATE"),
    ({"BREAKER_FAILURE_RATE": "0"}, "BREAKER_FAILURE_RATE"),
    ({"BREAKER_WINDOW": "0"}, "BREAKER_WINDOW"),
    ({"BREAKER_THRESHOLD": "5"}, "BREAKER_THRESHOLD"),  # no longer read: refused, not ignored
    ({"HTTPS_PROXY": "proxy.internal:3128"}, "HTTPS_PROXY"),
])
def test_a_bad_value_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: must be ")
    assert "\n" not in str(info.value)


def test_the_worker_requires_credentials_but_producers_do_not():
    s = Settings.from_env({})
    with pytest.raises(ConfigError, match="PLURAL_CLIENT_ID"):
        s.require_credentials()
    with pytest.raises(ConfigError, match="PLURAL_CLIENT_SECRET"):
        Settings.from_env({"PLURAL_CLIENT_ID": "x"}).require_credentials()
    full = Settings.from_env({"PLURAL_CLIENT_ID": "x", "PLURAL_CLIENT_SECRET": "y"})
    assert full.require_credentials() is full


def test_the_secret_never_shows():
    s = Settings.from_env({"PLURAL_CLIENT_ID": "cid", "PLURAL_CLIENT_SECRET": "s3cr3t-value",
                           "REDIS_URL": "redis://:redispass@host:6379/0",
                           "SENTRY_DSN": "https://publickey@sentry.example/1"})
    assert s.client_secret.reveal() == "s3cr3t-value"
    for text in (repr(s), str(s), str(s.describe())):
        assert "s3cr3t-value" not in text
    described = s.describe()
    assert "redispass" not in described["redis_url"]
    assert "publickey" not in described["sentry_dsn"]


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(Exception):
        s.rate_limit = 99


@pytest.mark.parametrize("variable, value, says", [
    ("PLURAL_RATE_LIMIT", "lots", "a number from 0.01 to 10000 calls per second (got 'lots')"),
    ("REDIS_URL", "redis://:s3cret@[::1", "a redis://, rediss:// or unix:// URL such as redis://host:6379/0, "
                                          "an IPv6 host in brackets ([::1])"),
    ("RESULT_TTL", "10000000000000000", "an integer from 3600 to 7776000 seconds (1 hour to 90 days) "
                                        "(got '10000000000000000')"),
    ("SENTRY_DSN", "https://k@[bad/1", "a Sentry DSN such as https://KEY@host/PROJECT_ID, an IPv6 host in "
                                       "brackets ([::1])"),
])
def test_a_worker_with_a_bad_setting_stops_with_one_line(variable, value, says):
    """``celery -A worker worker`` as a process of its own: exit status 2, one line, no traceback."""
    celery = str(__import__("pathlib").Path(sys.executable).with_name("celery"))
    result = subprocess.run([celery, "-A", "worker", "worker"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", variable: value,
                                 "PLURAL_CLIENT_ID": "a", "PLURAL_CLIENT_SECRET": "b"}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"plural-cancel: configuration error: {variable}: must be {says}"]


def test_a_worker_without_credentials_stops_with_one_line():
    celery = str(__import__("pathlib").Path(sys.executable).with_name("celery"))
    result = subprocess.run([celery, "-A", "worker", "worker"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 2
    assert "PLURAL_CLIENT_ID" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["beat"], ["inspect", "ping"], ["--app", "worker", "control", "shutdown"]])
def test_only_the_worker_needs_credentials(command):
    """``-A worker`` names the app, not the sub-command: beat and remote control start without them."""
    celery = str(__import__("pathlib").Path(sys.executable).with_name("celery"))
    args = command if command[0] == "--app" else ["-A", "worker", *command]
    result = subprocess.run([celery, *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage: celery" in result.stdout


@pytest.mark.parametrize("env, variable", [
    ({"CANCEL_ATTEMPT_TIMEOUT": "5"}, "CANCEL_ATTEMPT_TIMEOUT"),  # cannot fit a wait and one call (14.05 s)
    ({"LIMITER_MAX_WAIT": "120"}, "LIMITER_MAX_WAIT"),
    ({"PLURAL_READ_TIMEOUT": "3600"}, "PLURAL_READ_TIMEOUT"),
    ({"CANCEL_STALL_TIMEOUT": "0"}, "CANCEL_STALL_TIMEOUT"),
])
def test_settings_that_would_outlive_a_lease_are_refused(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_the_lease_is_derived_from_the_attempts_bound():
    from plural_cancel.config.celery import LEASE_MARGIN, celery_config, lease_seconds

    settings = Settings.from_env({"PLURAL_READ_TIMEOUT": "30"})
    assert settings.attempt_timeout == pytest.approx(1 + 2 * (3.05 + 30))  # a wait and two calls in full
    assert lease_seconds(settings) == settings.attempt_timeout + LEASE_MARGIN
    assert celery_config(settings)["broker_transport_options"]["visibility_timeout"] > lease_seconds(settings)
    # A result TTL shorter than the budget is fine: a live record never expires (tests/test_ledger.py).
    assert Settings.from_env({"RESULT_TTL": "3600"}).result_ttl == 3600 < Settings.retry_budget


class Recording(dict):
    """An environment that remembers every name asked of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)


def test_variables_names_every_variable_the_settings_read():
    asked = set()
    # Each branch that reads a variable of its own: https and http bases, a proxy (then NO_PROXY).
    for env in ({}, {"PLURAL_BASE_URL": "http://127.0.0.1:8800/api"}, {"HTTPS_PROXY": "http://proxy:3128"}):
        recording = Recording(env)
        Settings.from_env(recording)
        asked |= recording.asked
    assert asked == set(VARIABLES) | {"BREAKER_THRESHOLD"}  # read only to be refused
    assert len(VARIABLES) == len(set(VARIABLES))


def test_exports_are_shell_lines_and_keep_real_secrets_back():
    env = {"REDIS_URL": "redis://127.0.0.1:6380/0", "PLURAL_CLIENT_ID": "id with space",
           "PLURAL_CLIENT_SECRET": "s3cret", "HTTPS_PROXY": "http://user:pw@proxy:3128", "PATH": "/bin",
           "PLURAL_RATE_LIMIT": "", "HEALTH_DIR": "/run/pc"}
    lines = exports(env)
    assert lines == [
        "export PLURAL_CLIENT_ID='id with space'",
        "# PLURAL_CLIENT_SECRET is set here but not shown (it holds a secret): export the same value there",
        "export REDIS_URL=redis://127.0.0.1:6380/0",
        "# HTTPS_PROXY is set here but not shown (it holds a secret): export the same value there",
        "export HEALTH_DIR=/run/pc",
    ]
    assert "export PLURAL_CLIENT_SECRET=s3cret" in exports(env, reveal=["PLURAL_CLIENT_SECRET"])
    assert not any("pw" in line or "s3cret" in line for line in lines)


# -- values that passed and broke later, or broke with a traceback ---------------------------
# Each is refused by Settings.from_env with one line naming the variable and what it accepts;
# a URL's value is never repeated (it may carry a password).

REFUSED = [
    ({"REDIS_URL": "redis://127.0.0.1:99999/0"},
     "REDIS_URL: must be a redis://, rediss:// or unix:// URL such as redis://host:6379/0, its port a number from 1 "
     "to 65535"),
    ({"REDIS_URL": "redis://[::1"},
     "REDIS_URL: must be a redis://, rediss:// or unix:// URL such as redis://host:6379/0, an IPv6 host in brackets "
     "([::1])"),
    ({"REDIS_URL": "redis://127.0.0.1:6379/0?socket_timeout=abc"},
     "REDIS_URL: must be a URL whose query holds only a rediss:// URL's ssl_cert_reqs, ssl_ca_certs, ssl_certfile, "
     "ssl_keyfile, ssl_check_hostname (the broker, kombu, takes no others)"),
    ({"REDIS_URL": "redis://127.0.0.1:6379/abc"},
     "REDIS_URL: must be a URL whose path is a database number, such as redis://host:6379/0"),
    ({"PLURAL_BASE_URL": "http://[::1"},
     "PLURAL_BASE_URL: must be an http(s) URL such as https://host/api, an IPv6 host in brackets ([::1])"),
    ({"PLURAL_BASE_URL": "http://127.0.0.1:99999/api"},
     "PLURAL_BASE_URL: must be an http(s) URL such as https://host/api, its port a number from 1 to 65535"),
    ({"HTTP_PROXY": "http://[bad", "PLURAL_BASE_URL": "http://127.0.0.1:8800/api"},
     "HTTP_PROXY: must be an http(s) URL such as http://proxy.internal:3128, an IPv6 host in brackets ([::1])"),
    ({"https_proxy": "http://user:pw@[bad"},
     "https_proxy: must be an http(s) URL such as http://proxy.internal:3128, an IPv6 host in brackets ([::1])"),
    ({"HTTPS_PROXY": "http://proxy.internal:65536"},
     "HTTPS_PROXY: must be an http(s) URL such as http://proxy.internal:3128, its port a number from 1 to 65535"),
    ({"SENTRY_DSN": "https://k@[bad/1"},
     "SENTRY_DSN: must be a Sentry DSN such as https://KEY@host/PROJECT_ID, an IPv6 host in brackets ([::1])"),
    ({"SENTRY_DSN": "https://k@sentry.example/abc"},  # sentry-sdk's BadDsn at the worker's start
     "SENTRY_DSN: must be a Sentry DSN such as https://KEY@host/PROJECT_ID"),
    ({"RESULT_TTL": "10000000000000000"},
     "RESULT_TTL: must be an integer from 3600 to 7776000 seconds (1 hour to 90 days) (got '10000000000000000')"),
    ({"RESULT_TTL": "3153600000"},
     "RESULT_TTL: must be an integer from 3600 to 7776000 seconds (1 hour to 90 days) (got '3153600000')"),
    ({"PLURAL_RATE_LIMIT": "1e-320"},
     "PLURAL_RATE_LIMIT: must be a number from 0.01 to 10000 calls per second (got '1e-320')"),
    ({"REDIS_SENTINELS": "[::1", "REDIS_SENTINEL_MASTER": "m"},
     "REDIS_SENTINELS: must be a comma-separated list of host:port, such as 10.0.0.1:26379,10.0.0.2:26379, an IPv6 "
     "host in brackets ([::1]:26379) (got '[::1')"),
]


@pytest.mark.parametrize("env, message", REFUSED, ids=[next(iter(env.values())) for env, _ in REFUSED])
def test_values_that_broke_later_are_refused_in_one_line(env, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value) == message
    assert info.value.variable == message.split(":", 1)[0]


def test_outcome_retention_is_result_ttl_unless_set():
    assert Settings.from_env({"RESULT_TTL": "86400"}).outcome_retention == 86400
    assert Settings.from_env({"RESULT_TTL": "86400", "OUTCOME_RETENTION": "7200"}).outcome_retention == 7200
    with pytest.raises(ConfigError, match="OUTCOME_RETENTION"):
        Settings.from_env({"OUTCOME_RETENTION": "60"})


def test_the_accounts_file_is_a_path_the_settings_keep_but_never_read(tmp_path):
    """PLURAL_ACCOUNTS_FILE: kept as given (blank is unset); reading it is config.accounts' work,
    so a path to nothing is no error here (a producer host never reads it)."""
    assert Settings.from_env({}).accounts_file is None
    assert Settings.from_env({"PLURAL_ACCOUNTS_FILE": "  "}).accounts_file is None
    missing = str(tmp_path / "no-such-accounts.toml")
    assert Settings.from_env({"PLURAL_ACCOUNTS_FILE": f" {missing} "}).accounts_file == missing
    with pytest.raises(ConfigError, match="^PLURAL_ACCOUNTS_FILE: must be a value without control characters"):
        Settings.from_env({"PLURAL_ACCOUNTS_FILE": "/etc/accounts\n.toml"})
