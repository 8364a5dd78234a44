"""The import contract of the package, read from the source (function-level imports included).

Layers, each importing only the ones below it:

1. the library: every module not named below (data, io, models, ngrams, masks, subnetwork,
   search, evaluate, circuits, ...);
2. ``bigram_circuits.plots``: DataFrame in, figure out; it may import only ``errors``, ``io`` and ``tables``;
3. the application layer: ``bigram_circuits.app`` (commands, the paper pipeline, studies), the
   CLI and the ``torchrun`` entry point.

And no import cycle anywhere, so no layer can lean on another through a function-local import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "bigram_circuits"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
APPLICATION = ("bigram_circuits.app", "bigram_circuits.cli", "bigram_circuits.distributed.__main__")
PLOTS = ("bigram_circuits.plots",)
# What plots may use from the library: errors, the atomic file helpers and the pandas tables; no model code.
PLOTS_MAY_IMPORT = ("bigram_circuits.errors", "bigram_circuits.io", "bigram_circuits.tables")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (a name imported from a module resolves to it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``module`` imports anywhere in its file (top level, functions, classes)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub when one exists.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                resolved = _resolve(target, modules)
                if resolved and resolved != module:
                    found.add(resolved)
    # Importing pkg.sub runs pkg/__init__.py first, unless the importer is inside pkg already.
    for target in list(found):
        parent = target.rpartition(".")[0]
        while parent and parent != PACKAGE:
            if parent != module and not module.startswith(parent + "."):
                found.add(parent)
            parent = parent.rpartition(".")[0]
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> str:
    def within(prefixes: tuple[str, ...]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    if within(APPLICATION):
        return "application"
    if within(PLOTS):
        return "plots"
    return "library"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    allowed = {"library": {"library"}, "plots": {"plots"}, "application": {"library", "plots", "application"}}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source_layer, target_layer = layer_of(module), layer_of(target)
            if source_layer == "plots" and target_layer == "library" and target in PLOTS_MAY_IMPORT:
                continue
            if target_layer not in allowed[source_layer]:
                found.append(f"{module} ({source_layer}) imports {target} ({target_layer})")
    return found


def test_the_library_never_imports_plots_or_the_application_layer():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == {"library", "plots", "application"}
    assert violations(graph) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_function_level_imports_and_cycles(tmp_path):
    """The checks themselves: a function-local import back into the application layer is found,
    and so is the cycle it closes."""
    package = tmp_path / PACKAGE
    (package / "app").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "app" / "__init__.py").write_text("from bigram_circuits import search\n")
    (package / "search.py").write_text("def run():\n    from bigram_circuits.app import main\n")
    graph = import_graph(package)
    assert graph["bigram_circuits.search"] == {"bigram_circuits.app"}
    assert violations(graph) == ["bigram_circuits.search (library) imports bigram_circuits.app (application)"]
    assert cycles(graph) == [["bigram_circuits.app", "bigram_circuits.search"]]


@pytest.mark.parametrize("module", ["bigram_circuits.plots", "bigram_circuits.app"])
def test_the_layers_exist(module):
    assert module in package_modules()


def test_the_suite_checks_shapes_and_types_at_run_time(request):
    """pyproject's addopts import the package through jaxtyping's hook with beartype
    (tests/typechecks.py), so a wrong shape or type fails in the tests, not silently."""
    import jaxtyping
    import numpy as np

    from bigram_circuits.evaluate import pearson_r

    addopts = (ROOT.parent / "pyproject.toml").read_text()
    assert "--jaxtyping-packages=bigram_circuits,typechecks.checked" in addopts
    if not request.config.getoption("--jaxtyping-packages", None):
        pytest.skip("run-time checks are off in this run (addopts overridden)")

    assert pearson_r(np.arange(3.0), np.arange(3.0)) == pytest.approx(1.0)
    with pytest.raises(jaxtyping.TypeCheckError):
        pearson_r(np.zeros((2, 2)), np.zeros(2))  # Float[np.ndarray, " n"] is one axis
    with pytest.raises(jaxtyping.TypeCheckError):
        pearson_r([1.0, 2.0], np.zeros(2))  # a list is not an ndarray


def test_importing_a_submodule_counts_its_package_init(tmp_path):
    """``from pkg.sub import x`` runs ``pkg/__init__.py`` first: a cycle through it is found."""
    package = tmp_path / PACKAGE
    (package / "circuits").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "circuits" / "__init__.py").write_text("from bigram_circuits.circuits.lens import lens\n")
    (package / "circuits" / "lens.py").write_text("from bigram_circuits.evaluate import pearson_r\n")
    (package / "circuits" / "runs.py").write_text("")
    (package / "evaluate.py").write_text("from bigram_circuits.circuits.runs import RunSpec\n")
    graph = import_graph(package)
    assert "bigram_circuits.circuits" in graph["bigram_circuits.evaluate"]
    assert "bigram_circuits.circuits" not in graph["bigram_circuits.circuits.lens"]  # inside its own package
    assert cycles(graph) == [["bigram_circuits.circuits", "bigram_circuits.circuits.lens", "bigram_circuits.evaluate"]]
