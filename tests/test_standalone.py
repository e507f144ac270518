"""The repository stands alone: no tracked file refers to a path outside it.

The rule, for every tracked file (``git ls-files``):

- **Symlinks** must point inside the repository, and there are no submodules (a
  gitlink is a repository of its own, missing from a plain clone).
- **Relative paths with ``..``** must not climb above the repository's root: resolved
  from the file's own directory, and, for files that run from the root (Makefile,
  Procfile, Dockerfile, docker-compose.yml, pyproject.toml, shell scripts, which
  ``cd`` there first), from the root too. In Markdown a ``..`` path is a link, so it
  must also land on something tracked: a README in ``tests/data`` pointing at
  ``../sibling/DESIGN.md`` stays under the root, yet leads nowhere in a clone.
- **Absolute paths into a home or workspace directory** (under ``/home``, ``/Users``,
  ``/root``, ``/work``, ``/mnt``), ``file://`` URLs included: they name one machine's
  files.

Not references out of the repository: URLs (their paths belong to a host), system
locations that the README's set-up provides (``/usr/bin/redis-server``,
``/etc/ssl/certs``), the temporary directory (it holds nothing a checkout could depend
on; ``HEALTH_DIR`` defaults to it), and strings such as ``"../x"`` in tests, which stay
under the root (they are bad payment link ids, not files).

Outside a git checkout (a source tarball), the files on disk stand in for the tracked
ones, less what ``make`` and the tests create (``.venv``, ``var``, caches): the check
still means something to whoever unpacked it, so it does not skip.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUN_FROM_ROOT = {"Makefile", "Procfile", "Dockerfile", "docker-compose.yml", "pyproject.toml"}
"""Files whose relative paths are read from the repository's root."""

NOT_TRACKED = {".git", ".venv", "var", "build", "__pycache__", ".pytest_cache"}
"""What a tarball's tree holds that a clone would not track (``.gitignore``)."""

_PATH_RUN = re.compile(r"[\w.~/-]+")
"""A run of characters a path is made of; ``:`` ends one, so a URL's path starts with ``//``."""

_MACHINE_DIRS = "|".join(["home", "Users", "root", "work", "mnt"])
_ABSOLUTE = re.compile(rf"(?<![\w.~-])(?<!:/)/(?:{_MACHINE_DIRS})/[\w.~/-]*")
"""An absolute path into a home or workspace directory; ``file:///...`` too, not ``http://host/...``."""


def tracked_files(root: Path) -> list[tuple[str, str]]:
    """``(mode, path)`` of every tracked file (git's modes: 100644, 100755, 120000 symlink, 160000 gitlink)."""
    if (root / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=root, capture_output=True, check=True).stdout
        entries = []
        for record in out.decode().split("\0"):
            if record:
                meta, path = record.split("\t", 1)
                entries.append((meta.split()[0], path))
        return entries
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in NOT_TRACKED and not d.endswith(".egg-info")]
        for name in filenames:
            full = Path(dirpath, name)
            entries.append(("120000" if full.is_symlink() else "100644", full.relative_to(root).as_posix()))
    return entries


def escapes(path: str, start: str) -> bool:
    """Whether ``path``, relative, read from directory ``start`` (relative to the root), leaves the root."""
    resolved = posixpath.normpath(posixpath.join(start, path))
    return resolved == ".." or resolved.startswith("../")


_RST_DIRECTIVE = re.compile(r"\s*\.\. [a-z][a-z-]*::")


def references_outside(path: str, text: str, tracked: set[str]) -> list[str]:
    """Each reference to a path outside the repository in ``text``, the content of tracked file ``path``."""
    found = []
    here = posixpath.dirname(path) or "."
    from_root = path in RUN_FROM_ROOT or path.endswith(".sh") or path.startswith(".ci/")
    markdown = path.endswith(".md")
    for number, line in enumerate(text.splitlines(), 1):
        if markdown and _RST_DIRECTIVE.match(line):
            continue  # reStructuredText in a Markdown page (MyST's eval-rst): ".. click::" is no path
        for run in _PATH_RUN.findall(line):
            if run.startswith(("/", "~")) or ".." not in run.split("/"):
                continue
            if (escapes(run, here) or (from_root and escapes(run, "."))
                    or (markdown and posixpath.normpath(posixpath.join(here, run)) not in tracked
                        and not any(t.startswith(posixpath.normpath(posixpath.join(here, run)) + "/")
                                    for t in tracked))):
                found.append(f"{path}:{number}: {run}")
        found += [f"{path}:{number}: {m.group(0)}" for m in _ABSOLUTE.finditer(line)]
    return found


SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()
"""This file: its examples of what the rule flags are not references (skipped)."""


def outside_references(root: Path) -> list[str]:
    entries = [(mode, path) for mode, path in tracked_files(root) if path != SELF]
    tracked = {path for _, path in entries}
    found = []
    for mode, path in entries:
        full = root / path
        if mode == "160000":
            found.append(f"{path}: a submodule (a repository of its own)")
        elif mode == "120000":
            target = os.readlink(full)
            if posixpath.isabs(target) or escapes(target, posixpath.dirname(path) or "."):
                found.append(f"{path}: a symlink to {target}")
        elif full.is_file():
            data = full.read_bytes()
            if b"\0" not in data:  # text only
                found += references_outside(path, data.decode("utf-8", errors="replace"), tracked)
    return found


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    found = outside_references(ROOT)
    assert not found, "references to paths outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize("path, line, flagged", [
    ("README.md", "the design: [DESIGN](../sibling/DESIGN.md)", True),
    ("docs/cli.md", ".. click:: plural_cancel.cli:cli", False),   # a directive in an eval-rst fence
    ("docs/cli.md", ".. see ../sibling/DESIGN.md", True),
    ("tests/data/README.md", "see ../sibling/DESIGN.md", True),     # under the root, but tracks nothing
    ("scripts/run-local.sh", "source ../sibling/env.sh", True),      # the script runs from the root
    ("bench/README.md", "cd /work/main && make bench", True),
    ("tests/conftest.py", 'DATA = "/home/dev/plural/openapi.json"', True),
    ("README.md", "open file:///Users/dev/notes.md", True),
    ("tests/test_bulk.py", 'bad = ["../x", "pl/../slash"]', False),   # bad link ids, under the root
    ("README.md", "a link to [the tests](tests/data/README.md)", False),
    ("bench/README.md", "times sequential `PUT .../cancel`", False),
    ("scripts/run-local.sh", 'cd "$(dirname "$0")/.."', False),
    ("README.md", "https://example.com/home/x and http://work/api", False),
    ("Makefile", "command -v /usr/bin/redis-server; ls /etc/ssl/certs /tmp/x", False),
])
def test_the_rule_flags_paths_outside_and_nothing_else(path, line, flagged):
    tracked = {"README.md", "tests/data/README.md", "scripts/run-local.sh"}
    assert bool(references_outside(path, line, tracked)) is flagged
