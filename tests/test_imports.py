"""Every module of the product imports alone, and no two modules import each other, however
indirectly, at module level or inside a function (#14: a module that needs another's
function lazily is usually a sign that the function lives in the wrong place).

From the repository root the folders' short names (``celery -A worker``, ``from tasks
import ...``) are the namespaced packages' names only: no submodule under a short name,
and no module of ours loaded twice."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("config", "worker", "tasks", "sandbox")


def product_modules() -> dict[str, Path]:
    """``plural_cancel.<folder>.<module>`` -> its file, for every module of the design card's folders."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("plural_cancel", *parts))] = path
    modules["plural_cancel.errors"] = ROOT / "plural_cancel" / "errors.py"
    for path in sorted((ROOT / "plural_cancel" / "cli").glob("*.py")):
        name = "plural_cancel.cli" + ("" if path.stem == "__init__" else f".{path.stem}")
        modules[name] = path
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The product modules ``path`` imports anywhere in it (``from a.b import c`` counts as
    ``a.b.c`` when that is a module, else as ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where it was entered)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    modules = product_modules()
    known = set(modules)
    # A package's own __init__ importing its submodules to re-export them is not a cycle
    # of two concerns: the submodule's parent is imported first by Python itself.
    graph = {name: {t for t in imports_of(path, known) if not name.startswith(t + ".") and t != name}
             for name, path in modules.items()}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


# Run in a fresh interpreter: third-party libraries are imported once, then each product
# module is imported in a forked child of its own, so no product module is loaded before it.
_IMPORT_EACH = """
import os, sys, traceback
import celery, kombu, redis, requests, urllib3, click  # third-party only: shared by every child
import celery.app.base, kombu.transport.redis, cryptography.fernet, prometheus_client, sentry_sdk, redbeat  # noqa
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED " + " ".join(failed) if failed else "OK")
"""


def test_every_module_imports_alone():
    """Each in a process where no other product module was imported first: no module works
    only because another was imported before it."""
    names = [name for name, path in product_modules().items() if path.name != "__main__.py"]
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stdout[-800:] + done.stderr[-3000:]


# Run from the repository root, as `celery -A worker` and `python -m sandbox` are: the short
# names are importable there. Prints the name of the module found missing, if any.
_IMPORT_ONE = """
import sys
try:
    exec(sys.argv[1])
except ModuleNotFoundError as err:
    print("missing", err.name)
else:
    print("imported")
"""


@pytest.mark.parametrize("statement, missing", [
    ("import worker.ledger", "worker.ledger"),
    ("from worker.ledger import Ledger", "worker.ledger"),
    ("from worker.app import app", "worker.app"),
    ("from tasks.producer import enqueue_cancel", "tasks.producer"),
    ("from config.settings import Settings", "config.settings"),
    ("import sandbox.server", "sandbox.server"),
])
def test_a_short_name_has_no_submodules(statement, missing):
    """Under a short name a submodule would be a second copy of the namespaced one (a second
    Celery app, second metrics): the import fails instead."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_ONE, statement], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["missing", missing], done.stdout + done.stderr[-3000:]


_ONE_COPY = """
import json, sys
from pathlib import Path

import worker  # as celery -A worker imports it
from tasks import enqueue_cancel, enqueue_many, get_schedule, get_status, schedule_cancel, unschedule_cancel
import config, sandbox
import plural_cancel
import plural_cancel.worker.app, plural_cancel.worker.metrics, plural_cancel.tasks.producer
from prometheus_client import REGISTRY

worker.app.loader.import_default_modules()  # the task modules, as a worker loads them
app_module, producer = sys.modules["plural_cancel.worker.app"], sys.modules["plural_cancel.tasks.producer"]
names = ("enqueue_cancel", "enqueue_many", "get_schedule", "get_status", "schedule_cancel", "unschedule_cancel")
ours = [Path.cwd().resolve() / name for name in ("plural_cancel", "config", "tasks", "worker", "sandbox")]
files = [str(Path(m.__file__).resolve().relative_to(ours[0].parent)) for m in list(sys.modules.values())
         if getattr(m, "__file__", None) and any(Path(m.__file__).resolve().is_relative_to(d) for d in ours)]
print(json.dumps({
    "one_app": worker.app is app_module.app and worker.create_app is app_module.create_app
               and worker.app is sys.modules["plural_cancel.worker"].app,
    "one_producer": [n for n in names if not (getattr(sys.modules["tasks"], n) is getattr(producer, n)
                                              is getattr(plural_cancel, n))],
    "sandbox": sandbox.main is sys.modules["plural_cancel.sandbox.cli"].main,
    "metrics": [m.name for m in REGISTRY.collect() if m.name.startswith("plural_cancel_")],
    "twice": sorted({f for f in files if files.count(f) > 1}),
    "short_submodules": sorted(m for m in sys.modules if m.split(".")[0] in ("worker", "tasks", "config", "sandbox")
                               and "." in m),
}))
"""


def test_the_short_names_load_nothing_twice():
    """``celery -A worker`` imports ``worker`` by its short name and the app's modules then
    import ``plural_cancel.*``; a producer may say ``from tasks import ...``: one Celery app,
    one producer, one set of Prometheus metrics, each file of ours one module (but the four
    folders' ``__init__``, the short names' re-exports)."""
    done = subprocess.run([sys.executable, "-c", _ONE_COPY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["one_app"] and result["one_producer"] == [] and result["sandbox"]
    metrics = result["metrics"]
    assert "plural_cancel_cancels" in metrics and len(metrics) == len(set(metrics)), metrics
    assert result["twice"] == [f"{folder}/__init__.py" for folder in ("config", "sandbox", "tasks", "worker")]
    assert result["short_submodules"] == []
