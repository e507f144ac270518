"""The docs are true to the code, and the README stays a README.

- **configcheck**, as Celery's: every environment variable the product reads is in
  ``config/settings.py``'s ``REFERENCE`` (from which the docs' settings table is made),
  or in a short list of names that are not ours, each with its reason; and every name in
  ``REFERENCE`` is read.
- **The docs build** as ``make docs`` builds them: warnings are errors, so a broken link,
  a page left out of the table of contents or a reference the code no longer matches fails.
- **The README** is short, shows the quick start on its first screen and holds no dated
  figures or test timings (those live in ``bench/README.md`` and ``docs/development.md``).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from plural_cancel.config.settings import REFERENCE, Settings
from tests.conftest import ROOT

PACKAGES = ("config", "worker", "tasks", "plural_cancel", "sandbox")
"""The product's folders, whose every environment read is checked."""

NOT_OURS = {
    "REMAP_SIGTERM": "billiard (Celery's process library) reads it on import; the Procfile, the image and "
                     "`make run` set it so that SIGTERM is Celery's soft shutdown",
    "BREAKER_THRESHOLD": "an earlier version's setting, read only to be refused at start-up",
}
"""Names read (or set for a library) that are not settings of the product, and why; the
configuration page names each of them."""

SANDBOX_OWN: dict[str, str] = {}
"""Variables only the local Plural reads (``sandbox/``), were there any: documented on the
quick start's "The local Plural" rather than in ``REFERENCE``. Today it reads only
``PLURAL_CLIENT_ID`` and ``PLURAL_CLIENT_SECRET``, the worker's own."""


class Recording(Mapping):
    """An environment that notes every name it is asked for."""

    def __init__(self, values: dict[str, str]):
        self.values, self.asked = values, set()

    def __getitem__(self, name):
        self.asked.add(name)
        return self.values[name]

    def get(self, name, default=None):
        self.asked.add(name)
        return self.values.get(name, default)

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


def names_settings_read() -> set[str]:
    """What ``Settings.from_env`` asks the environment for, over environments that take each
    of its branches (an https and an http Plural, a proxy set, which then reads NO_PROXY)."""
    asked = set()
    for values in ({}, {"PLURAL_BASE_URL": "http://127.0.0.1:8800/api"},
                   {"HTTPS_PROXY": "http://proxy.internal:3128"}):
        env = Recording(values)
        Settings.from_env(env)
        asked |= env.asked
    # Names passed as literals to its get(): a read behind a branch the environments above miss.
    tree = ast.parse((ROOT / "config" / "settings.py").read_text())
    asked |= {node.args[0].value for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}
    return asked


def _environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def environment_reads() -> dict[str, list[str]]:
    """Every read of the environment in the product's folders, by name: ``os.environ[...]``,
    ``os.environ.get(...)``, ``os.getenv(...)`` and click's ``envvar=``, each with where it is.
    A read whose name is not a literal is listed under ``?`` (outside config/settings.py,
    whose reads :func:`names_settings_read` follows at run time, it fails the check)."""
    reads: dict[str, list[str]] = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), where)):
                names: list[ast.AST] = []
                if isinstance(node, ast.Subscript) and _environ(node.value):
                    names = [node.slice]
                elif isinstance(node, ast.Call):
                    func = node.func
                    if isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault", "pop") \
                            and _environ(func.value):
                        names = node.args[:1]
                    elif (isinstance(func, ast.Attribute) and func.attr == "getenv") or \
                            (isinstance(func, ast.Name) and func.id == "getenv"):
                        names = node.args[:1]
                    for keyword in node.keywords:
                        if keyword.arg == "envvar":
                            value = keyword.value
                            names += value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
                for name in names:
                    key = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else "?"
                    reads.setdefault(key, []).append(f"{where}:{node.lineno}")
    return reads


FOLLOWED_ELSEWHERE = ("config/settings.py:", "config/accounts.py:")
"""Modules whose reads by a name that is not a literal are followed otherwise: the settings'
at run time (:func:`names_settings_read`); the accounts file's, which read the variable an
account's ``client_secret_env`` names (the operator's own, see docs/accounts.md) and, for an
account with a ``base_url`` of its own, the proxy variables of the table."""


def test_every_variable_the_code_reads_is_documented_and_every_documented_one_is_read():
    documented = {variable.name for variable in REFERENCE}
    reads = environment_reads()
    dynamic = [where for where in reads.pop("?", []) if not where.startswith(FOLLOWED_ELSEWHERE)]
    assert not dynamic, f"environment reads whose name is not a literal, which this check cannot follow: {dynamic}"
    read = names_settings_read() | set(reads)
    undocumented = read - documented - set(NOT_OURS) - set(SANDBOX_OWN)
    assert not undocumented, (
        f"read but not in config/settings.py's REFERENCE (the docs' settings table): "
        f"{ {name: reads.get(name, ['config/settings.py']) for name in sorted(undocumented)} }")
    unread = documented - read
    assert not unread, f"in REFERENCE but read by no code: {sorted(unread)}"
    outside = {name: places for name, places in reads.items()
               if any(not p.startswith(("config/", "sandbox/")) for p in places)}
    assert not outside, f"the environment is read in config/ alone (and by the sandbox's options): {outside}"


def test_the_names_that_are_not_ours_are_explained_where_the_settings_are():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert [name for name in NOT_OURS if f"`{name}" not in page] == []
    quickstart = (ROOT / "docs" / "quickstart.md").read_text()
    assert [name for name in SANDBOX_OWN if name not in quickstart] == []


def test_the_configcheck_sees_reads_of_every_kind(tmp_path, monkeypatch):
    """The scan itself: each way of reading the environment is found, with its name."""
    import tests.test_docs as this

    package = tmp_path / "worker"
    package.mkdir()
    (package / "x.py").write_text(
        "import os\nfrom os import environ, getenv\nimport click\n"
        "a = os.environ['A_SUB']\nb = os.environ.get('B_GET')\nc = os.getenv('C_GETENV')\n"
        "d = environ.get('D_BARE')\ne = getenv('E_BARE')\nf = os.environ.get(name)\n"
        "@click.option('--g', envvar='G_CLICK')\n@click.option('--h', envvar=['H1', 'H2'])\ndef cmd(g, h): pass\n")
    monkeypatch.setattr(this, "ROOT", tmp_path)
    monkeypatch.setattr(this, "PACKAGES", ("worker",))
    assert set(this.environment_reads()) == {"A_SUB", "B_GET", "C_GETENV", "D_BARE", "E_BARE", "?", "G_CLICK",
                                             "H1", "H2"}


@pytest.mark.slow
def test_the_docs_build_with_no_warning(tmp_path):
    """``make docs``'s build (into a temporary directory): a warning fails it."""
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                             str(ROOT / "docs"), str(tmp_path / "html")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr
    # The generated references are there: every setting, every command.
    settings_page = (tmp_path / "html" / "configuration.html").read_text()
    assert [v.name for v in REFERENCE if f">{v.name}<" not in settings_page] == []
    cli_page = (tmp_path / "html" / "cli.html").read_text()
    for command in ("enqueue", "status", "check", "health", "stats", "failed-list", "failed-retry", "bulk",
                    "schedule", "unschedule", "sandbox"):
        assert f'id="plural-cancel-{command}"' in cli_page, command
    assert "enqueue_cancel" in (tmp_path / "html" / "api.html").read_text()


README = ROOT / "README.md"


def test_the_readme_is_short_and_starts_with_the_quick_start():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: the rest belongs in docs/"
    assert any("from plural_cancel import" in line for line in lines[:40]), "the quick start is not on the first screen"
    assert "make run" in README.read_text() and "make test" in README.read_text()


def test_the_readme_holds_no_dated_figures_or_test_timings():
    text = README.read_text()
    assert re.findall(r"\b20\d\d-\d\d-\d\d\b", text) == [], "dated figures belong in bench/README.md"
    assert re.findall(r"\d\s*min\b", text) == [], "test timings belong in docs/development.md and bench/README.md"


def test_the_readme_links_to_pages_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert links, "the README links into the docs"
    assert [link for link in links if not link.startswith("http") and not (ROOT / link).exists()] == []


def test_every_docs_page_is_in_the_table_of_contents():
    """Sphinx warns of a page outside every toctree too; this says which, without a build."""
    index = (ROOT / "docs" / "index.md").read_text()
    pages = {path.stem for path in Path(ROOT / "docs").glob("*.md")} - {"index"}
    assert [page for page in sorted(pages) if f"\n{page}\n" not in index] == []
