"""The shape of the package: imports point one way, Hydra and MLflow stay at the edges, and every
function can be read in one sitting. Read from the source (every import, at the top of a module or
inside a function), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cpo_exp"
# Only the entry point and the multirun callback compose or run Hydra; only the tracking
# package talks to MLflow.
HYDRA_ALLOWED = {"cpo_exp.cli", "cpo_exp.sweep"}
MLFLOW_ALLOWED = {"cpo_exp.tracking", "cpo_exp.tracking.worker", "cpo_exp.tracking.store"}
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(the package's modules ``module`` imports, the top-level names of everything it imports)."""
    inside, outside = set(), set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            outside.add(name.split(".")[0])
            while name and name not in known:
                name = name.rpartition(".")[0]
            # a submodule's import of its own package (its __init__) is the package's business
            if name and name != module and not module.startswith(name + "."):
                inside.add(name)
    return inside, outside


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycle_in_the_package(graph):
    edges = {name: inside for name, (inside, _) in graph.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_hydra_is_imported_only_by_the_entry_point_and_the_sweep_callback(graph):
    assert {name for name, (_, outside) in graph.items() if "hydra" in outside} <= HYDRA_ALLOWED


def test_mlflow_is_imported_only_by_the_tracking_package(graph):
    assert {name for name, (_, outside) in graph.items() if "mlflow" in outside} <= MLFLOW_ALLOWED


def test_the_engine_losses_and_data_pipeline_know_nothing_of_hydra_or_tracking(graph):
    for name, (inside, outside) in graph.items():
        if name.split(".")[1:2] in (["engine"], ["forward"], ["logprobs"], ["losses"], ["metrics"], ["data"],
                                    ["packing"]):
            assert "hydra" not in outside and not any(m.startswith("cpo_exp.tracking") for m in inside), name


def test_no_function_is_longer_than_one_sitting():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
