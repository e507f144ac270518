"""Procfile, docker-compose.yml and Dockerfile: Docker does not run here, so they are checked by reading.

Each process command must name a real entry point: the Celery app loads and is
configured the way the command expects, console scripts exist, options parse.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from plural_cancel.config.celery import lease_seconds
from plural_cancel.config.settings import VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = shlex.split(command)
    return entries


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolated(value: str) -> str:
    """A compose value with each ``${NAME:-default}`` as compose resolves it when NAME is unset."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", str(value))


def seconds(duration: str) -> float:
    """A compose duration (``45s``, ``1m30s``, ``1h``) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a compose duration: {duration!r}"
    h, m, s = (float(x or 0) for x in parts.groups())
    return 3600 * h + 60 * m + s


def strip_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        key, value = argv[0].split("=", 1)
        env[key] = value
        argv = argv[1:]
    return env, argv


def check_command(argv: list[str]) -> None:
    """Run the command's own ``--help`` (or the app's import) to prove the entry point is real."""
    program, *args = argv
    assert (BIN / program).exists(), f"{program} is not installed by pyproject.toml"
    if program == "celery":
        assert args[:2] == ["-A", "worker"] and args[2] in ("worker", "beat")
        # Loads the app exactly as the command would, and lets Celery parse the options.
        result = subprocess.run([str(BIN / "celery"), *args, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PLURAL_CLIENT_ID": "x",
                                                            "PLURAL_CLIENT_SECRET": "y"})
        assert result.returncode == 0, result.stderr
    elif program == "plural-cancel":
        result = subprocess.run([str(BIN / program), *args, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    else:
        pytest.fail(f"unexpected program {program}")


def test_procfile_runs_a_worker_and_beat_from_real_entry_points():
    entries = procfile()
    assert set(entries) == {"worker", "beat"}
    for name, argv in entries.items():
        env, argv = strip_env(argv)
        assert argv[:4] == ["celery", "-A", "worker", name]
        check_command(argv)
    # SIGTERM must be Celery's soft shutdown, which hands cancels in flight back.
    assert strip_env(entries["worker"])[0] == {"REMAP_SIGTERM": "SIGQUIT"}


def test_compose_has_redis_with_aof_the_sandbox_a_worker_and_beat():
    services = compose()["services"]
    assert set(services) == {"redis", "sandbox", "worker", "beat"}
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[0] == "redis-server" and "--appendonly" in redis_cmd
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    worker_env = services["worker"]["environment"]
    assert worker_env["REDIS_URL"] == "redis://redis:6379/0"
    assert worker_env["REMAP_SIGTERM"] == "SIGQUIT"
    # Without credentials the worker talks to the sandbox service, over the loopback of the
    # network namespace they share: plain http is refused to any other host.
    assert "http://127.0.0.1:8800/api" in worker_env["PLURAL_BASE_URL"]
    assert services["sandbox"]["command"][-2:] == ["--port", "8800"]
    for name in ("worker", "beat"):
        assert services[name]["network_mode"] == "service:sandbox"
        default = services[name]["environment"]["PLURAL_BASE_URL"].split(":-", 1)[1].rstrip("}")
        assert Settings.from_env({"PLURAL_BASE_URL": default}).plural_base_url == default
    assert services["beat"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_services_run_real_entry_points():
    services = compose()["services"]
    for name, service in services.items():
        if name == "redis":
            assert service["image"].split(":")[0] == "redis" and service["command"][0] == "redis-server"
        else:
            check_command(service["command"])


def test_compose_sets_only_variables_the_settings_read():
    """A misspelt or retired name would be ignored in silence (``BREAKER_THRESHOLD`` is refused)."""
    text = (ROOT / "docker-compose.yml").read_text()
    # REMAP_SIGTERM is Celery's own (SIGTERM as its soft shutdown), read before our settings.
    known = set(VARIABLES) | {"REMAP_SIGTERM"}
    for name, service in compose()["services"].items():
        unknown = set(service.get("environment") or {}) - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which config/settings.py does not read"
    passed_through = set(re.findall(r"\$\{(\w+)", text))
    assert passed_through and passed_through <= known, sorted(passed_through - known)


def test_compose_redis_keeps_every_write():
    """AOF, so a restart keeps the ledger and the queue; noeviction, so a full Redis refuses
    writes (which the worker rides out, docs/operations.md) instead of evicting records, locks or messages."""
    command = compose()["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2]))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("everysec", "always")
    assert options["--maxmemory-policy"] == "noeviction"


def test_compose_worker_outlasts_its_longest_attempt_when_stopped():
    """SIGTERM gives the cancels in flight the soft shutdown's grace, then hands their messages
    back; an attempt started just before may run its whole lease. Docker's SIGKILL must come later."""
    worker = compose()["services"]["worker"]
    settings = Settings.from_env({k: interpolated(v) for k, v in worker["environment"].items()})
    longest = settings.shutdown_grace + lease_seconds(settings)
    assert seconds(worker["stop_grace_period"]) > longest, (worker["stop_grace_period"], longest)
    assert worker["healthcheck"]["test"][1:3] == ["plural-cancel", "health"]


def test_compose_checks_the_health_of_the_worker_and_beat_without_redis():
    """Their healthchecks are liveness (``plural-cancel health``, tests/test_health.py): a Redis
    restart must not make them unhealthy, for whatever restarts unhealthy containers."""
    services = compose()["services"]
    for name in ("worker", "beat"):
        check = services[name]["healthcheck"]
        assert check["test"] == ["CMD", "plural-cancel", "health", f"--{name}"]
        check_command(check["test"][1:])
        seconds = {key: int(check[key].rstrip("s")) for key in ("interval", "timeout", "start_period")}
        assert seconds["timeout"] < seconds["interval"] and seconds["start_period"] >= 10
        assert check["retries"] >= 2


def test_dockerfile_copies_every_package_and_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for folder in folders:  # plural_cancel/cli comes with plural_cancel
        assert f"COPY {folder} ./{folder}" in text
    # With the sandbox extra: the compose file's sandbox service runs `plural-cancel sandbox` from this image.
    assert "pip install --no-cache-dir '.[sandbox]'" in text
    assert "ENV REMAP_SIGTERM=SIGQUIT" in text
    assert 'CMD ["celery", "-A", "worker", "worker"' in text


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"plural-cancel": "plural_cancel.cli:main"}


def env_example() -> list[tuple[str, str, str]]:
    """``.env.example`` as (name, value, the comment line above it)."""
    entries, comment = [], ""
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("#"):
            comment = line
        elif line.strip():
            name, value = line.split("=", 1)
            entries.append((name, value, comment))
            comment = ""
    return entries


def test_env_example_lists_every_setting_with_its_default():
    entries = env_example()
    assert [name for name, _, _ in entries] == list(VARIABLES)
    assert all(comment.strip("# ") for _, _, comment in entries), "each variable has a comment line above it"
    # Copied to .env as it is, it changes nothing: each value shown is the default.
    assert Settings.from_env({name: value for name, value, _ in entries}) == Settings.from_env({})
