"""Inside this repository, ``worker``, ``tasks``, ``config`` and ``sandbox`` are the same
modules as ``plural_cancel.worker`` and the rest, never second copies.

``celery -A worker worker`` (the contract) imports the folder ``worker/`` by its short
name from the repository root; tests and scripts say ``from tasks import ...``. Python
would load each such module a second time under the short name: a second Celery app,
second Prometheus counters, second signal handlers. So the first short-name import (in
the folder's ``__init__``) installs this finder, which hands out the namespaced module
for every short name. Not installed in a host project: there the short names are the
host's own, and the product is imported only as ``plural_cancel``.

Written by hand: importlib has aliases for nothing but this (``sys.modules`` entries
for the packages alone would leave their submodules to load twice).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

SHORT = ("worker", "tasks", "config", "sandbox")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``worker.x`` as ``plural_cancel.worker.x``, already loaded or loaded once now."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        # ``python -m sandbox`` runs ``sandbox/__main__.py`` itself; nothing else imports it.
        if top not in SHORT or fullname.endswith(".__main__"):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"plural_cancel.{spec.name}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just set the alias's spec on the module: give it its own back.
        module.__spec__ = module.__spec__.loader_state


def install(name: str) -> None:
    """Make ``name`` (a short name being imported) and its siblings the namespaced modules."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
    sys.modules[name] = importlib.import_module(f"plural_cancel.{name}")
