"""Structure rules of the package, checked on the source (no imports, well under a second).

- A module over 500 lines says why in its docstring (``LONG_REASON``).
- Imports form no cycle anywhere in ``clt_lens``, counting the ones inside functions too: a
  function-level import may keep ``clt-lens --help`` fast, but it must not hide a cycle (an
  import under ``if TYPE_CHECKING:`` is for annotations only and does not count).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clt_lens"
MAX_LINES = 500
LONG_REASON = "Longer than 500 lines because"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def long_modules_without_reason(root: Path = PACKAGE) -> list[str]:
    bad = []
    for name, path in _modules(root).items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_LINES and LONG_REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            bad.append(f"{name} ({n} lines)")
    return bad


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module, name: str, is_pkg: bool,
                          in_functions: bool = False) -> list[tuple[str, list[str]]]:  # fmt: skip
    """(module, imported names) of every import run when the module is imported (with
    ``in_functions``, also those run when its functions are called)."""
    found = []
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody
            for h in node.handlers:
                stack += h.body
        elif isinstance(node, ast.With):
            stack += node.body
        elif in_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.ClassDef, ast.For, ast.While)):  # fmt: skip
            stack += node.body + getattr(node, "orelse", [])
    return found


def import_graph(root: Path = PACKAGE, in_functions: bool = False) -> dict[str, set[str]]:
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        for mod, names in _module_level_imports(tree, name, path.name == "__init__.py",
                                                in_functions):
            for n in names or [None]:
                sub = f"{mod}.{n}" if n else None
                target = sub if sub in mods else mod
                if target in mods and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_long_modules_state_a_reason():
    bad = long_modules_without_reason()
    assert not bad, (f"modules over {MAX_LINES} lines without '{LONG_REASON} ...' in their "
                     f"docstring (split them, or say why not): {bad}")


def test_no_import_cycles():
    assert not cycles(import_graph()), "module-level import cycles"
    bad = cycles(import_graph(in_functions=True))
    assert not bad, f"import cycles hidden behind function-level imports: {bad}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    pkg = tmp_path / "clt_lens"
    (pkg / "cache").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cache" / "__init__.py").write_text("")
    (pkg / "cache" / "a.py").write_text("from clt_lens.cache.b import f\n")
    (pkg / "cache" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clt_lens.cache import c\n"
        "def f():\n    from clt_lens.cache import a\n")
    (pkg / "cache" / "c.py").write_text("from clt_lens.cache import b\n")
    assert cycles(import_graph(pkg)) == []  # type-only and function-level imports do not count
    hidden = cycles(import_graph(pkg, in_functions=True))
    assert hidden == [["clt_lens.cache.a", "clt_lens.cache.b"]]
    (pkg / "cache" / "b.py").write_text("from . import a\n" + "x = 1\n" * 501)
    assert cycles(import_graph(pkg)) == [["clt_lens.cache.a", "clt_lens.cache.b"]]
    assert long_modules_without_reason(pkg) == ["clt_lens.cache.b (502 lines)"]
    reason = f'"""B. {LONG_REASON} it is a table."""\n'
    (pkg / "cache" / "b.py").write_text(reason + "x = 1\n" * 501)
    assert long_modules_without_reason(pkg) == []
