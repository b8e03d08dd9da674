"""The arrows of DESIGN.md, enforced: model <- runtime <- {train, export, server}.

Parses every module's imports (function-level imports included: a deferred import is still a
dependency) and checks the allowed packages per package, and that no two modules import each other
in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "runtime", "train", "export", "server")
ALLOWED = {
    "model": {"model"},
    "runtime": {"model", "runtime"},
    "train": {"model", "runtime", "train"},
    "export": {"model", "runtime", "export"},
    "server": {"model", "runtime", "server"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported by the file at `path` (absolute and relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` may name a submodule: record it when it is one
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            while imp and imp not in modules:  # `from a.b import func` -> module a.b
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def test_packages_import_only_what_design_allows():
    bad = [f"{mod} imports {dep}" for mod, deps in _graph().items() for dep in deps
           if dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]]
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of behaviour; leave it out
    graph = {m: {d for d in deps if d != m.rpartition(".")[0]} for m, deps in graph.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The parser itself: a deferred `from export.x import y` inside a function counts."""
    f = tmp_path / "server" / "probe.py"
    f.parent.mkdir()
    f.write_text("def f():\n    from export.verify import verify\n    from . import app\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _imports(f) == {"export.verify", "export.verify.verify", "server", "server.app"}
