"""The design page's module map (docs/design.md) matches the tree: every module of the product is named in it,
and every module it names exists."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT


def test_the_design_page_names_every_module_and_only_modules_that_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    start = design.index("Modules (`tests/test_module_map.py`")
    end = design.find("\n\n", design.index("\n- ", start))
    section = design[start:end if end > 0 else len(design)]
    tracked = subprocess.run(["git", "ls-files", "config", "worker", "tasks", "plural_cancel"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    modules = {path for path in tracked if path.endswith(".py") and not path.endswith("__init__.py")}
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)+\.py)`", section))
    # "plural_cancel/cli/: ... `base.py`, `cancels.py`" names a folder's modules by their file names.
    for folder, listed in re.findall(r"`([a-z_]+/[a-z_]+/)`: [^(]*\(([^)]*)\)", section):
        named |= {folder + name for name in re.findall(r"`([a-z_]+\.py)`", listed)}
    assert modules - named == set(), f"modules the design page's map leaves out: {sorted(modules - named)}"
    assert {p for p in named if not (ROOT / p).exists()} == set(), "the map names modules that are gone"
