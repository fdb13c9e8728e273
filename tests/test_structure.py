"""The architecture, checked: what adding a protocol costs stays one module per role.

* No product file over 1,000 lines.
* No branch on a dialect's name outside the dialect modules (``harness/dialects/``,
  ``servers/<dialect>.py``, ``clients/<dialect>.py``): no comparison with a
  dialect-name literal, no table keyed by dialect names.  Everything else asks
  the registry, so a new dialect cannot be silently driven as another.
* No import inside a function (the way an import cycle gets hidden); imports
  for type checking only sit under ``if TYPE_CHECKING:``.  The cycles
  themselves are ruled out by the import-linter contracts (``tox -e lint``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "servers", "clients")
MAX_LINES = 1000

#: Names of protocols the project speaks or will speak: a literal of one of
#: these in a comparison outside a dialect module is a branch on a dialect.
DIALECT_WORDS = frozenset(
    "smtp submission lmtp imap pop3 sieve managesieve nntp ftp ldap postgres postgresql "
    "xmpp mysql irc".split()
)


def product_files() -> Iterator[Path]:
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def is_dialect_module(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "harness" and "dialects" in rel.parts[:-1]:
        return True
    return rel.parts[0] in ("servers", "clients") and path.stem in DIALECT_WORDS


def _is_dialect_literal(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.lower() in DIALECT_WORDS
    )


def dialect_branches(tree: ast.AST) -> List[int]:
    lines: List[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            found = any(_is_dialect_literal(o) for o in operands) or any(
                isinstance(o, (ast.Tuple, ast.List, ast.Set))
                and any(_is_dialect_literal(e) for e in o.elts)
                for o in operands
            )
            if found:
                lines.append(node.lineno)
        elif isinstance(node, ast.Dict):
            if sum(1 for k in node.keys if k is not None and _is_dialect_literal(k)) >= 2:
                lines.append(node.lineno)
        elif type(node).__name__ == "MatchValue" and _is_dialect_literal(
            getattr(node, "value", None)
        ):
            lines.append(node.lineno)
    return lines


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
    return name == "TYPE_CHECKING"


def imports_in_functions(tree: ast.AST) -> List[int]:
    lines: List[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if inside and isinstance(child, (ast.Import, ast.ImportFrom)):
                lines.append(child.lineno)
            visit(child, inside)

    visit(tree, False)
    return lines


def _parsed() -> List[Tuple[Path, ast.AST, int]]:
    out = []
    for path in product_files():
        text = path.read_text(encoding="utf-8")
        out.append((path, ast.parse(text), text.count("\n")))
    return out


PARSED = _parsed()


def test_there_is_product_code() -> None:
    assert len(PARSED) > 20


@pytest.mark.parametrize(
    "path,tree,lines", PARSED, ids=[str(p.relative_to(ROOT)) for p, _, _ in PARSED]
)
def test_structure_of(path: Path, tree: ast.AST, lines: int) -> None:
    rel = path.relative_to(ROOT)
    assert lines <= MAX_LINES, f"{rel}: {lines} lines (split it by responsibility)"
    if not is_dialect_module(path):
        assert not dialect_branches(tree), f"{rel}: branches on a dialect name"
    assert not imports_in_functions(tree), f"{rel}: imports inside functions"


def test_the_checks_can_fail() -> None:
    tree = ast.parse(
        "def f(d):\n    import os\n    if d == 'imap':\n        return {'smtp': 1, 'imap': 2}\n"
    )
    assert dialect_branches(tree) == [3, 4]
    assert imports_in_functions(tree) == [2]
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import os\n")
    assert imports_in_functions(typed) == []
