"""The package's layering, read from its source with ``ast`` (nothing is imported).

Rules (docs/architecture.md):

1. No import cycles between workbench modules.
2. No ``from workbench.x import _name`` (or ``x._name``) of a private name from another module: what
   other modules need is public and documented.
3. Paper modules import shared plumbing only: never another paper's module, never ``workbench.benchmarks``.
   Shared plumbing never imports a paper module; only the layers above the papers (benchmarks, plots,
   widgets, the reproduction report and the command line) do.

Every import counts: at module level, inside functions, under ``if TYPE_CHECKING:`` and
``importlib.import_module("workbench....")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "workbench"
PAPERS = ("timesteps", "distrifusion", "debias", "tif", "sadm", "singdiffusion")
ABOVE_PAPERS = ("benchmarks", "plots", "widgets", "reproduce", "__main__")


@dataclass(frozen=True)
class Import:
    """One import of a workbench module by another: ``importer`` takes ``names`` from ``target``."""

    importer: str
    target: str
    names: tuple[str, ...]
    path: str  # relative to the folder that holds the package
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under ``package_dir``, by dotted name (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def find_imports(name: str, path: Path, modules: Mapping[str, Path], *, root: Path) -> list[Import]:
    """The imports of workbench modules in one module's source, with their line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    shown = path.relative_to(root).as_posix()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    bound: dict[str, tuple[str, int]] = {}  # local name -> (module it is bound to, line)

    def add(target: str, names: tuple[str, ...], line: int) -> None:
        if target in modules:
            found.append(Import(name, target, names, shown, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, (), node.lineno)
                if alias.asname:
                    bound[alias.asname] = (alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    add(submodule, (), node.lineno)
                    bound[alias.asname or alias.name] = (submodule, node.lineno)
                else:
                    add(base, (alias.name,), node.lineno)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value, (), node.lineno)
    # `from workbench import zoo` then `zoo._entry(...)` takes a private name as surely as a from-import.
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            target, _ = bound[node.value.id]
            if _is_private(node.attr):
                found.append(Import(name, target, (node.attr,), shown, node.lineno))
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def paper_of(module: str) -> str | None:
    """The paper a module belongs to (``workbench.distrifusion.layers`` -> ``distrifusion``), or None."""
    parts = module.split(".")
    if len(parts) > 1:
        for paper in PAPERS:
            if parts[1].startswith(paper):
                return paper
    return None


def is_above_papers(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in ABOVE_PAPERS


def find_cycles(imports: Iterable[Import]) -> list[list[Import]]:
    """One cycle (as its chain of imports) for every group of modules that import one another in a ring."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    cycles = []
    for component in _strongly_connected(edges):
        if len(component) < 2:
            continue
        start = min(component)
        # Shortest way back to `start` inside the component: a breadth-first search over its edges.
        previous: dict[str, Import] = {}
        frontier, seen = [start], {start}
        while frontier and start not in previous:
            following = []
            for module in frontier:
                for target, imp in sorted(edges.get(module, {}).items()):
                    if target in component and (target not in seen or target == start) and target not in previous:
                        previous[target] = imp
                        seen.add(target)
                        following.append(target)
            frontier = following
        chain, module = [], start
        while True:
            chain.append(previous[module])
            module = previous[module].importer
            if module == start:
                break
        cycles.append(chain[::-1])
    return cycles


def _strongly_connected(edges: Mapping[str, Mapping[str, Import]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def private_imports(imports: Iterable[Import]) -> list[Import]:
    """Imports that take a private name from a module other than the importer."""
    return [imp for imp in imports if imp.target != imp.importer and any(_is_private(name) for name in imp.names)]


def layering_violations(imports: Iterable[Import]) -> list[tuple[Import, str]]:
    """Imports that cross the layers the wrong way, each with the rule it breaks."""
    violations = []
    for imp in imports:
        source, target = paper_of(imp.importer), paper_of(imp.target)
        if source and target and source != target:
            violations.append((imp, f"paper module imports another paper's module ({target})"))
        elif source and imp.target.split(".")[1:2] == ["benchmarks"]:
            violations.append((imp, "paper module imports benchmark code"))
        elif not source and target and not is_above_papers(imp.importer):
            violations.append((imp, f"shared plumbing imports a paper module ({target})"))
    return violations


def all_imports(package_dir: Path) -> list[Import]:
    modules = module_files(package_dir)
    root = package_dir.parent
    return [imp for name, path in modules.items() for imp in find_imports(name, path, modules, root=root)]


def _describe(imp: Import) -> str:
    names = f" ({', '.join(imp.names)})" if imp.names else ""
    return f"{imp.where()}: {imp.importer} imports {imp.target}{names}"


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports(ROOT / PACKAGE)


def test_the_import_graph_is_read(imports):
    # A guard against a parser that finds nothing and so passes every rule below.
    pairs = {(imp.importer, imp.target) for imp in imports}
    assert ("workbench.zoo", "workbench.training") in pairs
    assert ("workbench.zoo", "workbench.checkpoint") in pairs  # `from workbench import checkpoint`
    assert ("workbench.__main__", "workbench.zoo") in pairs  # imported inside a function


def test_no_import_cycles(imports):
    cycles = find_cycles(imports)
    message = "\n\n".join(
        "import cycle "
        + " -> ".join([chain[0].importer] + [imp.target for imp in chain])
        + ":\n"
        + "\n".join(f"  {_describe(imp)}" for imp in chain)
        for chain in cycles
    )
    if cycles:
        pytest.fail(message, pytrace=False)


def test_no_private_names_taken_from_other_modules(imports):
    found = private_imports(imports)
    if found:
        pytest.fail(
            "private names taken from another module (make them public and documented):\n"
            + "\n".join(f"  {_describe(imp)}" for imp in found),
            pytrace=False,
        )


def test_paper_modules_import_only_shared_plumbing(imports):
    found = layering_violations(imports)
    if found:
        pytest.fail(
            "imports against the layering:\n" + "\n".join(f"  {_describe(imp)}: {rule}" for imp, rule in found),
            pytrace=False,
        )


# The checker itself, on a small package written to tmp_path with one fault of each kind.
FAKE_PACKAGE = {
    "__init__.py": "",
    "zoo.py": "from workbench import training\n",
    "training.py": "def f():\n    from workbench.zoo import load\n",  # cycle zoo <-> training, in a function
    "timesteps/__init__.py": "from .schedule import make\n",
    "timesteps/schedule.py": "from workbench.distrifusion import layers\nfrom workbench.zoo import _entry\n",
    "distrifusion/__init__.py": "",
    "distrifusion/layers.py": "import importlib\nimportlib.import_module('workbench.benchmarks.y')\n",
    "benchmarks/__init__.py": "",
    "benchmarks/x.py": "from workbench import timesteps, zoo\nzoo._private_helper()\n",  # above the papers: allowed
    "benchmarks/y.py": "",
    "metrics.py": "from workbench.timesteps import make\n",
}


@pytest.fixture
def fake_imports(tmp_path) -> list[Import]:
    for relative, source in FAKE_PACKAGE.items():
        path = tmp_path / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return all_imports(tmp_path / PACKAGE)


def test_checker_finds_a_cycle_with_its_lines(fake_imports):
    (cycle,) = find_cycles(fake_imports)
    assert {(imp.importer, imp.target) for imp in cycle} == {
        ("workbench.training", "workbench.zoo"),
        ("workbench.zoo", "workbench.training"),
    }
    assert sorted(imp.where() for imp in cycle) == ["workbench/training.py:2", "workbench/zoo.py:1"]


def test_checker_finds_private_names_by_import_and_by_attribute(fake_imports):
    found = {(imp.importer, imp.names) for imp in private_imports(fake_imports)}
    assert found == {
        ("workbench.timesteps.schedule", ("_entry",)),
        ("workbench.benchmarks.x", ("_private_helper",)),
    }


def test_checker_finds_imports_across_the_layers(fake_imports):
    found = {(imp.importer, imp.target, rule.split(" (")[0]) for imp, rule in layering_violations(fake_imports)}
    assert found == {
        (
            "workbench.timesteps.schedule",
            "workbench.distrifusion.layers",
            "paper module imports another paper's module",
        ),
        ("workbench.distrifusion.layers", "workbench.benchmarks.y", "paper module imports benchmark code"),
        ("workbench.metrics", "workbench.timesteps", "shared plumbing imports a paper module"),
    }
