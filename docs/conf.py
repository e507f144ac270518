"""Sphinx configuration: Markdown pages (MyST), the furo theme, and references generated
from the code (the CLI from its click group, the settings from ``REFERENCE``, the API from
its docstrings). ``make docs`` builds it with warnings as errors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "plural-cancel"
author = "the plural-cancel team"
copyright = "the plural-cancel team"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",
    "settings_reference",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "plural-cancel"
highlight_language = "none"

# Headings get anchors, so that a page can link to a section of another: [x](operations.md#stats).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"



def _load_lazy_commands() -> None:
    """The CLI group loads a command's module only when the command is asked for (so that
    ``plural-cancel health`` starts fast); sphinx-click lists what the group already holds.
    Ask for each one here, so the reference names them all."""
    import click

    from plural_cancel.cli import cli

    ctx = click.Context(cli, info_name="plural-cancel")
    for name in cli.list_commands(ctx):
        cli.get_command(ctx, name)


_load_lazy_commands()
