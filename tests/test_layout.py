"""The layout: the spec's modules at the top level, the rest in packages by role, imports running one way.

Every module's imports are read with ``ast``, those inside functions too. A module may import only from its own
layer or a lower one (README, "Repository structure"); nothing imports ``main.py`` but the tests; no import circle
anywhere; no function outside ``tests/`` and ``benchmarks/`` is over 100 lines.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layer order, lowest first: a module imports only from its own layer or below (README says why).
LAYERS = [
    ["config"],
    ["runtime"],
    ["dataset", "dpo_utils", "ppo_utils"],
    ["modeling"],
    ["eval_utils"],
    ["training"],
    ["train_dpo", "train_ppo"],
    ["study"],
    ["main"],
    ["scripts", "benchmarks"],
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
SPEC_MODULES = {"main", "config", "dataset", "dpo_utils", "ppo_utils", "train_dpo", "train_ppo", "eval_utils"}
PACKAGES = {"runtime", "modeling", "training", "study"}


def _sources() -> dict[str, Path]:
    """``{dotted module name: path}`` for every project module outside tests/."""
    dirs = (*PACKAGES, "scripts", "benchmarks")
    files = [*ROOT.glob("*.py"), *(p for d in dirs for p in (ROOT / d).glob("*.py"))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (anywhere in the file), as dotted names in ``known``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(path, set(sources)) - {name} for name, path in sources.items()}


def _unit(module: str) -> str:
    return module.split(".")[0]


def test_the_top_level_holds_the_spec_modules_and_the_role_packages():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == SPEC_MODULES, f"top-level modules beyond the spec's: {sorted(top - SPEC_MODULES)}"
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{pkg}/__init__.py says what it holds and what it may import"
    every = {_unit(m) for m in _sources()}
    assert every <= set(RANK), f"modules in no layer: {sorted(every - set(RANK))}"


def test_imports_run_one_way_and_nothing_imports_main():
    graph = _graph()
    against = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if RANK[_unit(b)] > RANK[_unit(a)]]
    assert not against, f"imports against the layer order: {against}"
    assert not [a for a, deps in graph.items() if "main" in deps], "nothing outside tests/ imports main.py"


def test_no_import_circle():
    graph, state, circles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("limit", [100])
def test_no_function_outside_tests_and_benchmarks_is_over_100_lines(limit):
    long = []
    for name, path in _sources().items():
        if name.startswith("benchmarks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    """The reader finds a function-level import against the order: the check above can fail."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from study import grid\n    import main\n    return grid, main\n")
    assert _imports(bad, {"study", "study.grid", "main"}) == {"study.grid", "main"}


def test_config_is_at_most_600_lines():
    assert len((ROOT / "config.py").read_text().splitlines()) <= 600
