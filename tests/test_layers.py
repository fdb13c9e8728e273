"""The import layering of the product packages, checked from the source.

Top imports bottom only: ``cli``/``pytest_plugin`` > ``run`` > ``scenarios``,
``proxy``, ``servers``, ``clients`` > ``dialects`` > ``report``, ``tls``.
There is no import cycle, and the dialect, scenario and run layers do not
hide an import inside a function (the usual way of dodging a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the import name it is installed as.
PACKAGES = {
    "harness": "starttls_harness",
    "servers": "starttls_harness.servers",
    "clients": "starttls_harness.clients",
}
#: Sub-package (first name under starttls_harness) -> its layer; higher imports lower.
LAYERS = {
    "": 0,
    "tls": 0,
    "report": 0,
    "dialects": 1,
    "scenarios": 2,
    "proxy": 2,
    "servers": 2,
    "clients": 2,
    "run": 3,
    "cli": 4,
    "pytest_plugin": 4,
    "pytest_fleet": 4,
    "__main__": 4,
}
#: Where an import inside a function is not allowed.
NO_LOCAL_IMPORTS = ("dialects", "scenarios", "run", "pytest_plugin")


def _modules() -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def _imports(tree: ast.AST) -> Iterator[Tuple[ast.AST, List[str]]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node, [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            yield node, [a.name for a in node.names]


def _resolve(name: str, modules: Dict[str, Path]) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _layer(module: str) -> Tuple[str, int]:
    sub = module.split(".")[1] if "." in module else ""
    return sub, LAYERS[sub]


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for _, names in _imports(ast.parse(path.read_text())):
            for name in names:
                if name.startswith("starttls_harness"):
                    target = _resolve(name, modules)
                    if target and target != module:
                        edges.add(target)
        graph[module] = edges
    return graph


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    for module, edges in _graph().items():
        sub, rank = _layer(module)
        for target in edges:
            other, other_rank = _layer(target)
            if other_rank > rank:
                upward.append(f"{module} ({sub or 'top'}) imports {target} ({other})")
    assert not upward, "\n".join(sorted(upward))


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_import_hides_inside_a_function() -> None:
    hidden = []
    for module, path in _modules().items():
        if _layer(module)[0] not in NO_LOCAL_IMPORTS:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node, names in _imports(fn):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}: {names[-1]}")
    assert not hidden, "\n".join(hidden)
