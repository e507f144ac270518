"""The README's module map matches the tree: every module of the product is named in it,
and every module it names exists."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT


def test_the_readme_names_every_module_and_only_modules_that_exist():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Modules (`tests/test_module_map.py`")
    end = readme.find("\n\n", readme.index("\n- ", start))
    section = readme[start:end if end > 0 else len(readme)]
    tracked = subprocess.run(["git", "ls-files", "config", "worker", "tasks", "plural_cancel"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    modules = {path for path in tracked if path.endswith(".py") and not path.endswith("__init__.py")}
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)+\.py)`", section))
    # "plural_cancel/cli/: ... `base.py`, `cancels.py`" names a folder's modules by their file names.
    for folder, listed in re.findall(r"`([a-z_]+/[a-z_]+/)`: [^(]*\(([^)]*)\)", section):
        named |= {folder + name for name in re.findall(r"`([a-z_]+\.py)`", listed)}
    assert modules - named == set(), f"modules the README's map leaves out: {sorted(modules - named)}"
    assert {p for p in named if not (ROOT / p).exists()} == set(), "the map names modules that are gone"
