"""The package's import graph: no cycles, and every import points down the layers.

Every module under ``src/tokenfactory`` is parsed with ``ast`` (nothing is imported, so a
module that fails to import still counts), and every ``import`` statement is an edge, including
those inside functions and ``if TYPE_CHECKING`` blocks: an import deferred into a function
still couples the two modules, and issue 15 found cycles that were "broken" only that way.

The layers follow ../shared/DESIGN.md ("the package follows the request"; "nothing below
engine/ imports api/"), from the top down; a module may import its own package and any lower
layer, never a higher one nor a different package of its own layer:

  8  the facade: ``tokenfactory`` (``LLM``, ``SamplingParams``) and ``tokenfactory.cli``
  7  api        HTTP front door; it drives the engine and the text layer, bills through
                economics
  6  router     spreads requests over engine replicas, fed by their KV events; its simulator
                replays bench workloads on simulated engines
  5  bench      load generator and workloads; talks HTTP to a server, so it needs no engine
  4  engine     the factory floor: scheduler, KV pages, the engine loop; it builds the model
                executor and detokenizes through text
  3  model      the forward pass; it sees the engine only through the plain step types
  2  text, economics (peers: neither imports the other)
  1  the engine's plain types (``engine.step``, ``engine.request``, ``engine.sampling_params``,
     ``engine.kv_events``): plain data that the layers below the engine exchange with it
     (the executor receives a ``StepPlan``, the grammar reads ``SamplingParams``)
  0  ``tokenfactory.model_description``: the one config.json parser under model/ and economics/

Exceptions that other engineers are removing are listed in ``ALLOWED_EDGES`` and
``ALLOWED_CYCLES`` with the owner's name; the lists should end empty.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx   # a dependency of torch; used for strongly connected components

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Layer:
    rank: int                  # higher ranks may import lower ones
    group: str                 # modules of one group may import each other
    prefixes: tuple[str, ...]  # module names in the layer: exact, or a package and below


# Most specific prefix wins (engine.step is in the plain types, engine.core in the engine).
LAYERS: tuple[Layer, ...] = (
    Layer(8, "facade", ("tokenfactory", "tokenfactory.cli")),
    Layer(7, "api", ("tokenfactory.api",)),
    Layer(6, "router", ("tokenfactory.router",)),
    Layer(5, "bench", ("tokenfactory.bench",)),
    Layer(4, "engine", ("tokenfactory.engine",)),
    Layer(3, "model", ("tokenfactory.model",)),
    Layer(2, "text", ("tokenfactory.text",)),
    Layer(2, "economics", ("tokenfactory.economics",)),
    Layer(1, "engine-types", ("tokenfactory.engine.step", "tokenfactory.engine.request",
                              "tokenfactory.engine.sampling_params",
                              "tokenfactory.engine.kv_events")),
    Layer(0, "base", ("tokenfactory.model_description",)),
)

# Upward imports allowed while being removed: (importer, imported) -> who removes it and how.
# Empty: keep it so (the checks below fail on an entry whose import is gone).
ALLOWED_EDGES: dict[tuple[str, str], str] = {
}

# Cycles allowed while being broken: the modules of one strongly connected component -> owner.
# Empty: the package has no import cycle.
ALLOWED_CYCLES: dict[frozenset[str], str] = {
}


# ------------------------------------------------------------------------------ the checker
def module_names(src: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name -> file (a package is its
    ``__init__.py``)."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or the nearest enclosing module (``from
    tokenfactory.economics import load_model`` is an import of ``tokenfactory.economics``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path, package: str) -> nx.DiGraph:
    """Module -> modules it imports (within ``package``), from every import statement."""
    modules = module_names(src, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative: strip level-1 trailing parts of this package
                    base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # each name is a submodule or a name the module defines; the package itself
                # runs first, unless it is an ancestor of this module (already initialized,
                # like the parent of every module: ``from tokenfactory.model import layers``
                # inside tokenfactory.model.runner depends on layers, not on model/__init__)
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules
                           else module for alias in node.names]
                if not name.startswith(module + "."):
                    targets.append(module)
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    resolved = _resolve(target, modules)
                    if resolved is not None and resolved != name:
                        graph.add_edge(name, resolved)
    return graph


def layer_of(module: str, layers: tuple[Layer, ...] = LAYERS) -> Layer | None:
    best, best_len = None, -1
    for layer in layers:
        for prefix in layer.prefixes:
            exact_only = prefix.count(".") == 0    # the root package itself, not everything
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if len(prefix) > best_len:
                    best, best_len = layer, len(prefix)
    return best


def upward_imports(graph: nx.DiGraph,
                   layers: tuple[Layer, ...] = LAYERS) -> dict[tuple[str, str], str]:
    """Edges from a module to a higher layer, or to another group of its own layer:
    (importer, imported) -> a line saying which layers."""
    bad = {}
    for a, b in sorted(graph.edges):
        la, lb = layer_of(a, layers), layer_of(b, layers)
        if la is None or lb is None or la.group == lb.group:
            continue
        if lb.rank >= la.rank:
            bad[(a, b)] = (f"{a} ({la.group}, layer {la.rank}) imports {b} "
                           f"({lb.group}, layer {lb.rank})")
    return bad


def import_cycles(graph: nx.DiGraph) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (each holds a cycle)."""
    return sorted((frozenset(c) for c in nx.strongly_connected_components(graph) if len(c) > 1),
                  key=sorted)


def _describe_cycle(graph: nx.DiGraph, component: frozenset[str]) -> str:
    cycle = nx.find_cycle(graph.subgraph(component))
    return " -> ".join([a for a, _ in cycle] + [cycle[0][0]])


# ------------------------------------------------------------------------------ the package
GRAPH = import_graph(SRC, "tokenfactory")


def test_every_module_has_a_layer():
    missing = [m for m in GRAPH.nodes if layer_of(m) is None]
    assert not missing, f"modules outside the layer table (add them to LAYERS): {missing}"


def test_imports_point_down_the_layers():
    bad = [line for edge, line in upward_imports(GRAPH).items() if edge not in ALLOWED_EDGES]
    assert not bad, "imports from a lower layer to a higher one:\n  " + "\n  ".join(bad)


def test_allowed_edges_still_exist():
    """An exception whose import is gone must leave the list (so the list only shrinks)."""
    stale = [edge for edge in ALLOWED_EDGES if edge not in upward_imports(GRAPH)]
    assert not stale, f"remove from ALLOWED_EDGES: {stale}"


def test_no_import_cycles():
    cycles = import_cycles(GRAPH)
    bad = [_describe_cycle(GRAPH, c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not bad, "import cycles:\n  " + "\n  ".join(bad)
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in cycles]
    assert not stale, f"remove from ALLOWED_CYCLES (broken, or changed shape): {stale}"


# ------------------------------------------------------------------------------ the checker's own test
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_cycles_and_upward_imports(tmp_path):
    """A synthetic package with one cycle hidden in a function, one upward import through a
    relative import, and clean imports that must not be reported."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/top/__init__.py": "",
        "pkg/top/front.py": "from pkg.low import util\nfrom ..mid import core\n",
        "pkg/mid/__init__.py": "",
        "pkg/mid/core.py": "import pkg.low.util\n",
        "pkg/top/settings.py": "",
        "pkg/low/__init__.py": "from pkg.low.helper import *\n",
        "pkg/low/util.py": "def f():\n    from ..low import helper\n    from ..top import settings\n",
        "pkg/low/helper.py": "from . import util\n",
    })
    layers = (Layer(2, "top", ("pkg.top",)), Layer(1, "mid", ("pkg.mid",)),
              Layer(0, "low", ("pkg.low",)), Layer(3, "root", ("pkg",)))
    graph = import_graph(tmp_path, "pkg")
    assert set(graph.successors("pkg.top.front")) == {"pkg.low.util", "pkg.low", "pkg.mid",
                                                      "pkg.mid.core"}
    assert [sorted(c) for c in import_cycles(graph)] == [["pkg.low.helper", "pkg.low.util"]]
    # a child importing a sibling through its parent package does not depend on the parent's
    # __init__ (which imports helper): the cycle is helper <-> util only
    assert set(graph.successors("pkg.low.util")) == {"pkg.low.helper", "pkg.top",
                                                     "pkg.top.settings"}
    bad = upward_imports(graph, layers)
    assert list(bad.values()) == [
        "pkg.low.util (low, layer 0) imports pkg.top (top, layer 2)",
        "pkg.low.util (low, layer 0) imports pkg.top.settings (top, layer 2)"]
    assert layer_of("pkg", layers).group == "root"
    assert layer_of("pkg.other", layers) is None     # the root prefix is the root module only
