"""Every setting fed hostile values (#20): :meth:`Settings.from_env` accepts a value within the
range ``config.settings.REFERENCE`` documents, or refuses it with one line naming the variable;
the command line then says that line on stderr, exit status 2, no traceback, and writes nothing
to Redis (a real redis-server, its ``dbsize`` read before and after).

A hand-written table rather than generated values: each entry is a mistake someone makes or a
value that once broke something, and a failure names it exactly."""

from __future__ import annotations

import os

import pytest

from plural_cancel.config.settings import REFERENCE, VARIABLES, Settings
from plural_cancel.errors import ConfigError
from tests.support import cli
from tests.support.workers import ROOT

SECRET = "s3cret-pw"

HOSTILE = [
    # empty-ish, whitespace, control characters
    "", " ", "\t\n", "\r\n", "a\nb", "a\tb", "a\x00b", "\x00", "\x7f",
    # numbers at and past every edge
    "0", "-0", "-1", "1", "2", "1.5", ".5", "5.", "0.0000001", "1e-320", "5e-324", "1e308", "-1e308", "1e309",
    "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "10000000000000000", "3153600000", "9" * 400, "1" * 5000,
    "1_000", "0x10", "0o7", "1e3", " 42 ", "+7", "--1", "1,5", "١٠", "²",
    # not numbers
    "abc", "true", "auto", "None", "é", "日本", "😀", "%", "${HOME}", "' OR 1=1 --", "x" * 10_000,
    # unbalanced brackets, bad ports, URLs that urlsplit or a client chokes on
    "[", "]", "[::1", "[::1]", "[::1]:26379", "[bad]:1", "host:", ":1", "h:0", "h:70000", "h:1,,h:2", "a:b:c",
    "10.0.0.0/99", "*,", "http://[::1", "http://[bad", "https://k@[bad/1", "http://h:abc/", "http://h:0/api",
    "http://h:99999/api", "http://127.0.0.1:99999/api", "redis://[::1", "redis://127.0.0.1:99999/0",
    "redis://h:0/0", "redis://h/abc", "redis://h/0/", "redis://h/0?socket_timeout=abc", "redis://h/0?foo=bar",
    f"redis://:{SECRET}@[::1", f"redis://:{SECRET}@h:99999/0", f"http://user:{SECRET}@[bad",
    f"http://user:{SECRET}@proxy:99999", f"https://{SECRET}@[bad/1", "ftp://h/", "//h/", "h",
]

CONTEXT = {
    "http_proxy": {"PLURAL_BASE_URL": "http://127.0.0.1:8800/api"},
    "HTTP_PROXY": {"PLURAL_BASE_URL": "http://127.0.0.1:8800/api"},
    "no_proxy": {"HTTPS_PROXY": "http://proxy.internal:3128"},
    "NO_PROXY": {"HTTPS_PROXY": "http://proxy.internal:3128"},
    "REDIS_SENTINELS": {"REDIS_SENTINEL_MASTER": "m"},
    "REDIS_SENTINEL_MASTER": {"REDIS_SENTINELS": "127.0.0.1:26379"},
}
"""What else must be set for a variable to be read at all (a proxy for NO_PROXY...)."""

SECRET_HOLDERS = {"REDIS_URL", "SENTRY_DSN", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY",
                  "PLURAL_CLIENT_ID", "PLURAL_CLIENT_SECRET"}
"""Variables whose value may carry a secret: never repeated in the line (any value with a
password in it is not, whichever variable it was given to)."""

RANGED = [variable for variable in REFERENCE if variable.range is not None]


def verdict(name: str, value: str) -> ConfigError | Settings:
    try:
        return Settings.from_env({**CONTEXT.get(name, {}), name: value})
    except ConfigError as exc:
        return exc


def refused(name: str) -> list[str]:
    return [value for value in HOSTILE if isinstance(verdict(name, value), ConfigError)]


@pytest.mark.parametrize("name", VARIABLES)
def test_a_value_is_accepted_within_its_range_or_refused_in_one_line_naming_the_variable(name):
    for value in HOSTILE:
        result = verdict(name, value)
        if isinstance(result, Settings):
            for variable in RANGED:
                got = getattr(result, variable.field)
                assert got == "auto" and variable.name == "REDIS_WAIT_REPLICAS" or got in variable.range, \
                    (name, value, variable.name, got)
            continue
        line = str(result)
        # A blank value is unset: what then fails is the variable that needed it (NO_PROXY's proxy...).
        assert result.variable == name or not value.strip() and result.variable in CONTEXT.get(name, {}), \
            (name, value, line)
        assert line.startswith(f"{result.variable}: must be ") and "\n" not in line and len(line) < 400, (value, line)
        assert SECRET not in line
        if name in SECRET_HOLDERS:
            assert "(got " not in line, line


def cli_env(redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in VARIABLES and not k.startswith(("PLURAL_", "SENTRY_", "CANCEL_", "REDIS_"))}
    env.update(REDIS_URL=redis_url, PLURAL_CLIENT_ID="test-client", PLURAL_CLIENT_SECRET="test-secret-do-not-leak")
    env.update(settings)
    return env


@pytest.mark.parametrize("name", VARIABLES)
def test_the_command_line_refuses_a_bad_value_in_one_line_and_writes_nothing(name, redis_url, redis_client, tmp_path):
    links = tmp_path / "links.txt"
    links.write_text("pl-hostile-1\npl-hostile-2\n")
    bad = [value for value in refused(name) if "\x00" not in value]  # an environment cannot hold a NUL
    assert bad, f"no hostile value refused for {name}"
    for value in bad:
        for args in (("enqueue", "pl-hostile-1"), ("bulk", str(links))):
            result = cli.run(cli_env(redis_url, **CONTEXT.get(name, {}), **{name: value}), *args)
            assert (result.returncode, result.stdout) == (2, ""), (name, value, args, result.stderr)
            assert "Traceback" not in result.stderr
            [line] = result.stderr.splitlines()
            assert line.startswith("plural-cancel: configuration error: ") and SECRET not in line, line
            assert redis_client.dbsize() == 0, (name, value, args)


@pytest.mark.parametrize("settings, args", [
    ({"REDIS_URL": f"redis://:{SECRET}@[::1"}, ("enqueue", "pl-hostile-1")),
    ({"PLURAL_RATE_LIMIT": "1e-320"}, ("bulk", "{links}")),
    ({"RESULT_TTL": "3153600000"}, ("stats",)),
], ids=lambda item: ",".join(item) if isinstance(item, dict) else item[0])
def test_the_console_script_says_what_the_command_says_here(settings, args, redis_url, redis_client, tmp_path):
    """A few through the real console script, a process of its own: the same bytes as in-process."""
    links = tmp_path / "links.txt"
    links.write_text("pl-hostile-1\n")
    args = tuple(arg.format(links=links) for arg in args)
    env = cli_env(redis_url, **settings)
    here = cli.run(env, *args)
    alone = cli.run_process(env, *args, cwd=ROOT)
    assert (alone.returncode, alone.stdout, alone.stderr) == (here.returncode, here.stdout, here.stderr)
    assert alone.returncode == 2 and len(alone.stderr.splitlines()) == 1 and "Traceback" not in alone.stderr
    assert SECRET not in alone.stderr
    assert redis_client.dbsize() == 0


def test_the_tables_ranges_are_what_from_env_enforces():
    """Each ranged variable's two bounds are accepted, and just past them refused."""
    for variable in RANGED:
        bounds = variable.range
        for inside in (bounds.low, bounds.high):
            text = str(int(inside)) if bounds.integer else repr(float(inside))
            if variable.name == "CANCEL_ATTEMPT_TIMEOUT":  # and at least the wait and both timeouts
                env = {"LIMITER_MAX_WAIT": "0", "PLURAL_CONNECT_TIMEOUT": "0.1", "PLURAL_READ_TIMEOUT": "0.1"}
            else:
                env = {}
            assert getattr(Settings.from_env({**env, variable.name: text}), variable.field) == inside, variable.name
        step = 1 if bounds.integer else bounds.low / 2 or 0.001
        for outside in (bounds.low - step, bounds.high + step):
            text = str(int(outside)) if bounds.integer else repr(float(outside))
            with pytest.raises(ConfigError, match=f"^{variable.name}: must be "):
                Settings.from_env({variable.name: text})
