"""The layers in the folder names hold: cli/ above flows/ above components/; benchmarks beside flows; no circles."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "flows", "components", "benchmarks")
ALLOWED = {  # who may import whom (anywhere in a file, function-level imports included)
    "cli": {"cli", "flows", "components", "benchmarks"},
    "flows": {"flows", "components"},
    "benchmarks": {"benchmarks", "components"},
    "components": {"components"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(tree: ast.AST, top_level_only: bool = False) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_no_layer_is_crossed():
    crossings = []
    for name, path in _modules().items():
        layer = name.split(".")[0]
        for target in _imports(ast.parse(path.read_text())):
            if target.split(".")[0] not in ALLOWED[layer]:
                crossings.append(f"{path.relative_to(REPO)} imports {target}")
    assert not crossings, "layer crossed:\n" + "\n".join(sorted(crossings))


def test_no_import_circles_at_module_level():
    modules = _modules()
    graph = {name: {t for t in _imports(ast.parse(path.read_text()), top_level_only=True) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_layer_check_catches_a_crossing(tmp_path):
    """The rule itself: a components module importing flows is reported (so the checks above can fail)."""
    tree = ast.parse("def f():\n    from flows.retrain import retrain\n")
    assert {t.split(".")[0] for t in _imports(tree)} - ALLOWED["components"] == {"flows"}
