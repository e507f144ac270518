"""Every module of the product imports alone, and no two modules import each other, however
indirectly, at module level or inside a function (#14: a module that needs another's
function lazily is usually a sign that the function lives in the wrong place)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
