"""The shape of the import graph of compiler/, passes/ and runtime/, read with `ast` (nothing is imported).

Three rules (docs/pipeline.md, DESIGN.md "Layout"):
- no import cycles between modules, counting every import: one deferred into a
  function or put under `if TYPE_CHECKING:` hides a cycle, it does not remove it;
- no private name crosses a module boundary: neither `from .x import _name` nor
  `x._name` on a module imported as `x` (dunders such as `__version__` are public);
- dependencies run one way, compiler -> passes -> runtime: runtime imports
  neither of the others and passes does not import the compiler.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"compiler": "sparsecc", "passes": "sparsecc.passes", "runtime": "sparsecc.runtime"}  # pyproject's map
# the packages a module of each may import from (compiler -> passes -> runtime)
MAY_IMPORT = {"sparsecc.runtime": ("sparsecc.runtime",), "sparsecc.passes": ("sparsecc.passes", "sparsecc.runtime")}


@dataclass(frozen=True)
class Import:
    """One import's reach into our packages: `source` imports `names` from module `target`; `alias` is
    the local name bound to `target` itself (`import a.b as x`, `from a import b`), if any."""
    source: str
    target: str
    names: tuple[str, ...]
    line: int
    alias: Optional[str] = None

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """Module name -> file, for every .py file under the mapped folders (`__init__.py` names its package)."""
    modules = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def _base(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module a `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    package = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
    package = package[:len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module: str, tree: ast.Module, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file (module level or inside functions) that reaches one of our modules."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, (), node.lineno, a.asname) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            found += _from_import(module, path, node, modules)
    return found


def _from_import(module: str, path: Path, node: ast.ImportFrom, modules: dict[str, Path]) -> list[Import]:
    base = _base(node, module, path)
    found = [Import(module, f"{base}.{a.name}", (), node.lineno, a.asname or a.name)
             for a in node.names if f"{base}.{a.name}" in modules]
    attributes = tuple(a.name for a in node.names if f"{base}.{a.name}" not in modules)
    if base in modules and (attributes or not found):
        found.append(Import(module, base, attributes, node.lineno))
    return found


def private_uses(module: str, tree: ast.Module, imports: list[Import]) -> list[str]:
    """`from x import _name`, a private module `_x`, and `x._name` where `x` is one of our modules imported by name."""
    problems = [f"{i.where()} imports {n} from {i.target}" for i in imports
                for n in i.names if _private(n) and i.target != module]
    problems += [f"{i.where()} imports private module {i.target}" for i in imports
                 if _private(i.target.rpartition(".")[2]) and not i.names]
    aliases = {i.alias: i.target for i in imports if i.alias}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr) \
                and node.value.id in aliases:
            problems.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return problems


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(imports: list[Import]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for i in imports:
        if i.source != i.target:
            graph.add_edge(i.source, i.target, line=i.line)
    return graph


def cycles(graph: nx.DiGraph) -> list[str]:
    """The shortest import cycle through each module that is on one, each import with its line."""
    rings = set()
    for group in nx.strongly_connected_components(graph):
        if len(group) < 2:
            continue
        sub = graph.subgraph(group)
        for module in group:
            back = min((nx.shortest_path(sub, after, module) for after in sub.successors(module)), key=len)
            rings.add(_rotated([module, *back[:-1]]))
    return sorted(_format_ring(graph, ring) for ring in rings)


def _format_ring(graph: nx.DiGraph, ring: tuple[str, ...]) -> str:
    hops = [f"{a}:{graph.edges[a, b]['line']}" for a, b in zip(ring, ring[1:] + ring[:1])]
    return " -> ".join(hops + [ring[0]])


def _rotated(ring: list[str]) -> tuple[str, ...]:
    """The same cycle always starts at its smallest name, so each is reported once."""
    start = ring.index(min(ring))
    return tuple(ring[start:] + ring[:start])


def layering(imports: list[Import]) -> list[str]:
    """Imports against compiler -> passes -> runtime."""
    problems = []
    for i in imports:
        layer = next((p for p in MAY_IMPORT if i.source == p or i.source.startswith(p + ".")), None)
        allowed = MAY_IMPORT.get(layer, ())
        if layer and not any(i.target == a or i.target.startswith(a + ".") for a in allowed):
            problems.append(f"{i.where()} imports {i.target} ({layer} may import only {', '.join(allowed)})")
    return problems


def survey(root: Path, packages: dict[str, str]) -> dict[str, list[str]]:
    """The problems of each kind in the tree under `root`."""
    modules = module_files(root, packages)
    trees = {m: ast.parse(path.read_text(), str(path)) for m, path in modules.items()}
    imports = {m: imports_of(m, trees[m], path, modules) for m, path in modules.items()}
    every = [i for found in imports.values() for i in found]
    return {"cycles": cycles(import_graph(every)),
            "private": [p for m in modules for p in private_uses(m, trees[m], imports[m])],
            "layering": layering(every)}


def _report(problems: list[str]) -> str:
    return f"{len(problems)} found:\n" + "\n".join(problems)


SURVEY = survey(ROOT, PACKAGES)


def test_no_import_cycles():
    assert not SURVEY["cycles"], _report(SURVEY["cycles"])


def test_no_private_names_cross_modules():
    assert not SURVEY["private"], _report(SURVEY["private"])


def test_dependencies_run_compiler_passes_runtime():
    assert not SURVEY["layering"], _report(SURVEY["layering"])


def test_the_survey_finds_each_kind_of_problem(tmp_path):
    files = {
        "compiler/__init__.py": "",
        "compiler/api.py": "from sparsecc.passes import manager\n",
        "passes/__init__.py": "",
        "passes/manager.py": "from .rules import RULES\n",
        "passes/rules.py": "def f():\n    from .manager import run\n",
        "passes/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .api import Model\n",
        "passes/api.py": "from .typed import Model\n",
        "runtime/__init__.py": "",
        "runtime/ops.py": "from . import kernels\nfrom .kernels import _tile, __doc__\n",
        "runtime/kernels.py": "from sparsecc.passes.rules import f\n",
        "runtime/table.py": "import sparsecc.runtime.kernels as k\nk._tile\nfrom . import _hidden\n",
        "runtime/_hidden.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = survey(tmp_path, PACKAGES)
    assert found["cycles"] == ["sparsecc.passes.api:1 -> sparsecc.passes.typed:3 -> sparsecc.passes.api",
                               "sparsecc.passes.manager:1 -> sparsecc.passes.rules:2 -> sparsecc.passes.manager"]
    assert found["private"] == ["sparsecc.runtime.ops:2 imports _tile from sparsecc.runtime.kernels",
                                "sparsecc.runtime.table:3 imports private module sparsecc.runtime._hidden",
                                "sparsecc.runtime.table:2 reads sparsecc.runtime.kernels._tile"]
    assert found["layering"] == ["sparsecc.runtime.kernels:1 imports sparsecc.passes.rules "
                                 "(sparsecc.runtime may import only sparsecc.runtime)"]
