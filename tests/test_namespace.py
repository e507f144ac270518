"""``from plural_cancel import ...`` works from a host project whose own ``config``, ``tasks``
and ``worker`` packages come first on ``sys.path``, and never touches them.

Each case runs a real Python process in a host project made here, against a real Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HOST_SCRIPT = textwrap.dedent("""
    import json, sys
    import config, tasks, worker
    from config import settings
    from plural_cancel import (enqueue_cancel, enqueue_many, get_schedule, get_status, schedule_cancel,
                               unschedule_cancel)
    import plural_cancel

    request_id = enqueue_cancel("pl-host-000001", request_id="host-order-1-expiry")
    ids = enqueue_many(["pl-host-000002", "pl-host-000003"])
    print(json.dumps({
        "host": [config.MARKER, settings.MARKER, tasks.MARKER, worker.MARKER],
        "status": get_status(request_id), "many": [get_status(i)["state"] for i in ids],
        "plural_cancel": plural_cancel.__file__,
        "short_names_loaded": sorted(m for m in sys.modules
                                     if m.split(".")[0] in ("config", "tasks", "worker", "sandbox")),
    }))
""")


@pytest.fixture
def host(tmp_path):
    """A host project (think cookiecutter-django) with its own config, tasks and worker packages."""
    project = tmp_path / "host"
    for name in ("config", "tasks", "worker"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f'MARKER = "host {name}"\n')
    (project / "config" / "settings.py").write_text('MARKER = "host config.settings"\n')
    (project / "manage.py").write_text(HOST_SCRIPT)
    return project


def run_host(host: Path, redis_url: str, pythonpath: list[Path]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The host project first, as `python manage.py` puts it; the product after it.
    env.update(PYTHONPATH=os.pathsep.join(str(p) for p in [host, *pythonpath]), REDIS_URL=redis_url)
    done = subprocess.run([sys.executable, "manage.py"], cwd=host, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(result: dict) -> None:
    assert result["host"] == ["host config", "host config.settings", "host tasks", "host worker"]
    status = result["status"]
    assert (status["request_id"], status["payment_link_id"], status["state"]) == (
        "host-order-1-expiry", "pl-host-000001", "queued")
    assert result["many"] == ["queued", "queued"]
    # The host's own packages are the only short names loaded: ours were never imported by them.
    assert result["short_names_loaded"] == ["config", "config.settings", "tasks", "worker"]


def test_the_repository_checkout_behind_a_host_project(host, redis_url, redis_client):
    result = run_host(host, redis_url, [ROOT])
    check(result)
    assert Path(result["plural_cancel"]).parent == ROOT / "plural_cancel"
    assert redis_client.llen("plural-cancel") + redis_client.llen("celery") == 3  # the messages were sent


def test_the_installed_distribution_behind_a_host_project(host, tmp_path, redis_url):
    """Built as a wheel and installed alone: one top-level name, ``plural_cancel``."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # Built from a copy of what the distribution is made of: a checkout's build/ and
    # *.egg-info left by earlier installs must not leak into it.
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in ("plural_cancel", "config", "worker", "tasks", "sandbox"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(source)], check=True, timeout=300, capture_output=True)
    [wheel] = wheels.glob("plural_cancel-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    top_level = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", "__pycache__")))
    assert top_level == ["bin", "plural_cancel"] or top_level == ["plural_cancel"]
    result = run_host(host, redis_url, [target])
    check(result)
    assert Path(result["plural_cancel"]).parent == target / "plural_cancel"
