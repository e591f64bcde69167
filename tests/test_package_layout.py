"""The helpers package is a tree: module-level imports between its modules form no circle, the leaf
`paths` imports nothing of the package, and the three layers of `helpers.LAYERS` are respected."""
import ast
from pathlib import Path

import networkx as nx
import pytest

import helpers

PACKAGE = Path(helpers.__file__).parent


def module_level_imports(path: Path) -> set[str]:
    """helpers.* modules imported at module level (not inside functions, which import lazily)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
            if node.module == "helpers":
                found |= {f"helpers.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("helpers.")}
    return found


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        name = f"helpers.{path.stem}"
        graph.add_node(name)
        for target in module_level_imports(path):
            if (PACKAGE / f"{target.split('.')[1]}.py").exists():
                graph.add_edge(name, target)
    return graph


def test_no_import_circles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import circles among helpers modules: {cycles}"


@pytest.mark.parametrize("leaf", ["helpers.paths", "helpers.stats"])
def test_leaves_import_nothing_of_the_package(leaf):
    assert not list(import_graph().successors(leaf))


def _layer_of() -> dict[str, int]:
    return {f"helpers.{m}": i for i, mods in enumerate(helpers.LAYERS.values()) for m in mods}


def test_every_module_sits_in_one_layer():
    layer = _layer_of()
    modules = {f"helpers.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert modules == set(layer), f"unlisted: {sorted(modules - set(layer))}, missing: {sorted(set(layer) - modules)}"
    assert len(layer) == sum(len(m) for m in helpers.LAYERS.values()), "a module is listed in two layers"


def test_imports_go_up_the_layers_and_experiments_stay_apart():
    layer, graph, experiments = _layer_of(), import_graph(), len(helpers.LAYERS) - 1
    for a, b in graph.edges:
        assert layer[b] <= layer[a], f"{a} (layer {layer[a]}) imports {b} from a lower layer ({layer[b]})"
        assert not (layer[a] == layer[b] == experiments), f"experiment module {a} imports experiment module {b}"
