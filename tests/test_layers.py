"""The layers in the folder names hold: cli/ above flows/ above components/; benchmarks beside flows; no circles.

Inside components/ the lifecycle subpackages are layered too: data < model < evaluate < train < study,
with ops beside study; config.py, threads.py and fingerprint.py (process-wide settings, hashing) sit below them all.
No module of components/, flows/ or cli/ is longer than MAX_LINES.
"""
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


COMPONENT_LAYERS = {  # a components subpackage may import itself and the ones listed (config, threads: everyone)
    "data": set(),
    "model": {"data"},
    "evaluate": {"data", "model"},
    "train": {"data", "model", "evaluate"},
    "study": {"data", "model", "evaluate", "train"},
    "ops": {"data", "model", "evaluate", "train"},
}
BASE_MODULES = ("config", "threads", "fingerprint")  # process-wide settings and hashing: below every subpackage
BASE = {"components", *(f"components.{m}" for m in BASE_MODULES)}  # they import no subpackage
LEGACY = {"components.serving"}  # the old pickled class path of logged pyfunc models (see the module)
MAX_LINES = 400


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


def _component_crossings(name: str, targets: set[str]) -> list[str]:
    """The components modules `name` (a components module) may not import."""
    parts = name.split(".")
    home = parts[1] if len(parts) > 2 else None  # components.<sub>.<module>; None for the base modules
    allowed = COMPONENT_LAYERS[home] | {home} if home else set()
    bad = []
    for target in targets:
        if not target.startswith("components") or target in BASE or (
                target.split(".")[0] == "components" and target.split(".")[1] in BASE_MODULES):
            continue
        sub = target.split(".")[1]
        if sub not in allowed:
            bad.append(target)
    return bad


def test_components_subpackages_are_layered():
    """data < model < evaluate < train < study (ops beside study); config/threads import no subpackage."""
    modules = _modules()
    assert set(COMPONENT_LAYERS) == {p.name for p in (REPO / "components").iterdir()
                                     if p.is_dir() and (p / "__init__.py").is_file()}
    crossings = []
    for name, path in modules.items():
        if name.split(".")[0] != "components" or name in LEGACY:
            continue
        for target in _component_crossings(name, _imports(ast.parse(path.read_text()))):
            crossings.append(f"{path.relative_to(REPO)} imports {target}")
    assert not crossings, "components layer crossed:\n" + "\n".join(sorted(crossings))


def test_the_component_layer_check_catches_a_crossing():
    assert _component_crossings("components.data.datasets", {"components.train.sft", "components.config"}) == \
        ["components.train.sft"]
    assert _component_crossings("components.config", {"components.model.models"}) == ["components.model.models"]
    assert _component_crossings("components.ops.serving", {"components.model.decoding", "components.threads"}) == []


def test_no_module_is_too_long():
    """Files stay readable top to bottom: none under components/, flows/, cli/ over MAX_LINES lines."""
    long = [f"{p.relative_to(REPO)}: {n} lines" for package in ("components", "flows", "cli")
            for p in sorted((REPO / package).rglob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)


def test_pyproject_installs_every_package():
    """setuptools' explicit `packages` list names every package folder (a new subpackage is not left out of a wheel)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for package in PACKAGES
             for p in (REPO / package).rglob("__init__.py")}
    assert listed == found
