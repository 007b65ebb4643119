"""The package's layering, checked on its source (no imports executed):
dependencies point one way (base -> ops -> engine -> distributed -> data ->
method -> app -> cli; bench on the side), no import cycles between modules, and no
function-level imports of the package's own modules unless the line says why."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hipro_fast"

# Layer of each top-level entry of the package; a module may import its own
# layer and those below. The package __init__ only re-exports the public API.
# distributed sits above the engine (it shards the forest) and below data
# (sharded feature caching) and method (data-parallel fit/evaluate).
LAYERS = {"errors": 0, "files": 0, "usage": 0, "devices": 0, "ops": 1, "engine": 2, "distributed": 3, "data": 4, "method": 5, "app": 6,
          "cli": 7, "__init__": 8, "_C": 1}
BENCH_MAY_IMPORT = {"errors", "files", "usage", "devices", "ops", "engine", "distributed", "data", "method"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(node: ast.ImportFrom | ast.Import, current: str) -> list[str]:
    """Package modules an import statement reads (``from . import x`` reads the
    submodule x when there is one, else the package itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "hipro_fast"]
    if node.level:
        base = current.split(".") if _is_package(current) else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "hipro_fast":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES or sub == "hipro_fast._C" else target)
    return out


def _imports(name: str) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, source line) of every package import of `name`."""
    path = MODULES[name]
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _resolve(child, name):
                    found.append((target, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return found


def _layer(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_scan_sees_the_package():
    # Guards the checks below against scanning nothing.
    assert len(MODULES) > 25 and "hipro_fast.method.model" in MODULES
    assert any(t == "hipro_fast.engine.encoder" for t, *_ in GRAPH["hipro_fast.method.model"])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    mine = _layer(name)
    for target, line, _, _ in GRAPH[name]:
        theirs = _layer(target)
        if mine == "bench":
            assert theirs in BENCH_MAY_IMPORT | {"bench", "_C"}, f"{name}:{line} imports {target} (bench sits beside app)"
        elif theirs == "bench":
            assert mine in ("cli", "__init__"), f"{name}:{line} imports the benchmarks ({target})"
        else:
            assert LAYERS[theirs] <= LAYERS[mine], (
                f"{name}:{line} ({mine}, layer {LAYERS[mine]}) imports {target} ({theirs}, layer {LAYERS[theirs]})")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_unexplained_function_level_imports(name):
    for target, line, in_function, text in GRAPH[name]:
        if in_function:
            assert "#" in text, f"{name}:{line} imports {target} inside a function without a comment saying why"


def test_no_import_cycles():
    edges = {name: sorted({t for t, *_ in GRAPH[name] if t in MODULES and t != name}) for name in MODULES}
    # A package __init__ re-exports its children, so child -> parent package
    # edges are the one cycle Python resolves by design; they are not allowed
    # either: modules import siblings directly.
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            dfs(name)


def test_no_string_based_module_loading():
    for name, path in MODULES.items():
        src = path.read_text()
        assert 'import_module(f"hipro_fast' not in src and "import_module('hipro_fast" not in src, name
