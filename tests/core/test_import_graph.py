"""The import graph of the product packages: no cycles, and the core imports no service code.

Built from the source with ``ast``, so it sees every import statement: at module level, inside
functions and under ``if TYPE_CHECKING:``. Importing a module also runs its parent packages'
``__init__``; those implicit edges are not counted, only import statements. Modules named by
string (``importlib.import_module``: the CLI's sub-command table, the detector registry) are not
edges either: they are looked up at run time, by name.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("anomaly", "storage", "streams", "dashboards")
# What the core (``anomaly``) must never import: the service packages and their drivers.
NOT_IN_CORE = {"storage", "streams", "dashboards", "confluent_kafka", "sqlalchemy", "alembic"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _product_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """What the import statements of ``path`` import, as absolute names: for ``from package import
    module``, the module; for ``from module import name``, the module."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".")
                if not is_package:
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _product_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in _imported_names(name, path, modules):
            # ``import a.b.c`` / ``from a.b import c``: the deepest product module named.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_in_functions_and_type_checking_blocks() -> None:
    graph = _graph()
    # model.save imports the bundle module inside the method; the facade names the model only
    # under TYPE_CHECKING: both must be edges, or the cycle check below would miss cycles.
    assert "anomaly.estimator.bundle" in graph["anomaly.estimator.model"]
    assert "anomaly.estimator.model" in graph["anomaly"]
    assert "anomaly.evaluation.report" in graph["anomaly.evaluation.run"]


def test_no_import_cycles_between_product_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_core_imports_no_service_code() -> None:
    modules = _product_modules()
    offending = {
        name: sorted(
            target
            for target in _imported_names(name, path, modules)
            if target.split(".")[0] in NOT_IN_CORE
        )
        for name, path in modules.items()
        if name.split(".")[0] == "anomaly"
    }
    assert {name: found for name, found in offending.items() if found} == {}


@pytest.mark.parametrize(
    "module", sorted(name for name in _product_modules() if name.split(".")[0] == "anomaly")
)
def test_every_core_module_imports(module: str) -> None:
    if module == "anomaly.cli.__main__":
        pytest.skip("runs the command line when imported")
    importlib.import_module(module)


def test_the_public_names_resolve_through_the_lazy_facade() -> None:
    import anomaly

    for name in anomaly.__all__:
        assert getattr(anomaly, name) is not None, name
    assert anomaly.AnomalyModel.__module__ == "anomaly.estimator.model"
    assert anomaly.Preprocessor.__module__ == "anomaly.features.preprocess"
    assert anomaly.GANDetector.__module__ == "anomaly.estimator.detectors.gan"
