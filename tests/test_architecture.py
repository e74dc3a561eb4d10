"""Imports flow one way: the import graph of src/leukodiff, read with `ast`, against the
table in docs/ARCHITECTURE.md ("Packages, and what each may import").

Every import counts: at module level, inside functions (lazy imports), and under
`if TYPE_CHECKING:`. A package may import only the packages its row allows; a few
edges are narrower still (`NARROW`: which modules, and whether only lazily, each
with its reason). No cycle between packages, and none between modules at import time.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "leukodiff"

BASE = {"taxonomy", "imaging"}
# package -> the leukodiff packages it may import (its own modules always), in layer
# order, lowest first: a package imports only rows above its own. taxonomy, imaging <
# data < models < pipeline < metrics < training < evaluation; reports sit on the pipeline
# and the typed records in metrics, server on reports (and on training, narrowly); cli on
# everything.
ALLOWED: dict[str, set[str]] = {
    "taxonomy": set(),
    "imaging": set(),
    "data": BASE,
    "models": {"data"} | BASE,
    "pipeline": {"models", "data"} | BASE,
    "metrics": {"pipeline", "data"} | BASE,
    "training": {"metrics", "pipeline", "models", "data"} | BASE,
    "evaluation": {"training", "metrics", "pipeline", "models", "data"} | BASE,
    "reports": {"metrics", "pipeline", "data"} | BASE,
    "server": {"reports", "pipeline", "models", "data", "training"} | BASE,
    "cli": {"server", "reports", "evaluation", "training", "metrics", "pipeline", "models",
            "data"} | BASE,
    "leukodiff": {"pipeline", "taxonomy"},  # the package itself: src/leukodiff/__init__.py
}


@dataclass(frozen=True)
class Narrow:
    """An allowed package edge limited to some modules; `lazily`: only inside functions
    (or for type checking), and, with `only_in`, only from those importing modules."""

    anywhere: tuple[str, ...] = ()
    lazily: tuple[str, ...] = ()
    only_in: tuple[str, ...] = ()
    why: str = ""


NARROW: dict[tuple[str, str], Narrow] = {
    ("metrics", "pipeline"): Narrow(
        anywhere=("leukodiff.pipeline.boxes",),
        why="detection metrics use the pipeline's numpy box arithmetic (area, intersection), "
            "never the Analyzer"),
    ("reports", "metrics"): Narrow(
        anywhere=("leukodiff.metrics.records", "leukodiff.metrics.study",
                  "leukodiff.metrics.labs", "leukodiff.metrics.adaptation",
                  "leukodiff.metrics.heldout"),
        why="reports render the typed records evaluations return and store (dataclasses "
            "and their JSON); they compute no metric"),
    ("pipeline", "models"): Narrow(
        anywhere=("leukodiff.models.files",),
        lazily=("leukodiff.models.io", "leukodiff.models.mobilenet"),
        only_in=("leukodiff.pipeline.backends",),
        why="the pipeline reads model files and manifests; only its torch backend loads the "
            "torch networks, when chosen (the pipeline runs on onnxruntime without torch)"),
    ("server", "models"): Narrow(
        anywhere=("leukodiff.models.files",),
        why="the station hashes and resolves model files; it runs them through the pipeline"),
    ("server", "training"): Narrow(
        lazily=("leukodiff.training",),
        only_in=("leukodiff.server.adapt_job",),
        why="the Models page's adapt job only, lazily: a station without torch still serves"),
    ("leukodiff", "pipeline"): Narrow(
        lazily=("leukodiff.pipeline",),
        why="`import leukodiff` stays light: the Analyzer is imported on first use (PEP 562)"),
}

# Imports by name at run time (importlib) that the graph cannot see: where they may be.
DYNAMIC_IMPORTS = {
    "leukodiff.server": "PEP 562: create_app and Settings from the server's own modules",
}


@dataclass(frozen=True)
class Import:
    importer: str  # module, e.g. leukodiff.training.adapt
    imported: str  # the module it names (a submodule when `from package import module`)
    kind: str  # "module" (runs at import), "function" (lazy) or "typing" (TYPE_CHECKING)
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.kind}, line {self.line})"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))
            if "migrations" not in p.relative_to(SRC).parts}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "leukodiff"


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.module, self.modules = module, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.kinds = ["module"]
        self.found: list[Import] = []
        self.dynamic: list[int] = []

    def _add(self, name: str, line: int) -> None:
        if name == "leukodiff" or name.startswith("leukodiff."):
            self.found.append(Import(self.module, name, self.kinds[-1], line))

    def _nested(self, node: ast.AST, kind: str) -> None:
        self.kinds.append(kind)
        self.generic_visit(node)
        self.kinds.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, "function" if self.kinds[-1] == "module" else self.kinds[-1])

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self.kinds.append("typing")
            for child in node.body:
                self.visit(child)
            self.kinds.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the importing module's package
            base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(submodule if submodule in self.modules else source, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if name in ("import_module", "__import__"):
            self.dynamic.append(node.lineno)
        self.generic_visit(node)


def read_imports() -> tuple[list[Import], dict[str, list[int]]]:
    modules = _modules()
    found, dynamic = [], {}
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found += visitor.found
        if visitor.dynamic:
            dynamic[module] = visitor.dynamic
    return found, dynamic


IMPORTS, DYNAMIC = read_imports()


def _within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def violations(imports: list[Import]) -> list[str]:
    """Each import the table forbids, with the rule it breaks."""
    found = []
    for i in imports:
        source, target = package_of(i.importer), package_of(i.imported)
        if source == target:
            continue
        if target not in ALLOWED.get(source, set()):
            found.append(f"{i}: `{source}` may not import `{target}`")
            continue
        rule = NARROW.get((source, target))
        if rule is None or _within(i.imported, rule.anywhere):
            continue
        lazy_ok = (i.kind != "module" and _within(i.imported, rule.lazily)
                   and (not rule.only_in or i.importer in rule.only_in))
        if not lazy_ok:
            found.append(f"{i}: `{source}` -> `{target}` is limited ({rule.why})")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    assert len(IMPORTS) > 100
    kinds = {i.kind for i in IMPORTS}
    assert {"module", "function"} <= kinds, kinds
    lazy = {(i.importer, i.imported) for i in IMPORTS if i.kind == "function"}
    assert ("leukodiff.server.adapt_job", "leukodiff.training.adapt") in lazy


def test_every_module_is_in_a_package_of_the_table():
    unknown = sorted({m for m in _modules() if package_of(m) not in ALLOWED})
    assert not unknown, f"add these packages to ALLOWED and docs/ARCHITECTURE.md: {unknown}"


def test_packages_import_only_what_the_table_allows():
    wrong = violations(IMPORTS)
    assert not wrong, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_training_imports_nothing_from_evaluation():
    assert not [str(i) for i in IMPORTS if package_of(i.importer) == "training"
                and package_of(i.imported) == "evaluation"]


def test_the_table_is_one_way_and_so_is_the_code():
    below: set[str] = set()
    for package, allowed in ALLOWED.items():  # layer order: each imports only rows above
        assert allowed <= below, f"{package} imports a layer above it: {allowed - below}"
        below.add(package)
    assert not cycles(ALLOWED)
    edges: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        if package_of(i.importer) != package_of(i.imported):
            edges[package_of(i.importer)].add(package_of(i.imported))
    assert not cycles(edges)


def test_no_cycle_between_modules_at_import_time():
    edges: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        if i.kind == "module" and i.importer != i.imported:
            edges[i.importer].add(i.imported)
    assert not cycles(edges)


def test_the_server_app_is_built_on_the_routes_never_the_reverse():
    # The app imports the routes (at module level); the routes reach the station's state
    # through `server.state`, and import `server.app` nowhere, not even lazily.
    assert ("leukodiff.server.app", "leukodiff.server.routes") in {
        (i.importer, i.imported) for i in IMPORTS if i.kind == "module"}
    assert not [str(i) for i in IMPORTS if i.importer.startswith("leukodiff.server.routes")
                and i.imported == "leukodiff.server.app"]


def test_imports_by_name_only_where_known():
    assert set(DYNAMIC) <= set(DYNAMIC_IMPORTS), DYNAMIC


def test_the_table_names_every_package_of_the_architecture_page():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Packages, and what each may import", 1)[1].split("\n## ", 1)[0]
    named = {name for row in section.splitlines() if row.startswith("| `")
             for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert named == set(ALLOWED) - {"leukodiff"}, named ^ (set(ALLOWED) - {"leukodiff"})

