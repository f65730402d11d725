"""The package's layers hold: read every module with ``ast`` (nothing is imported) and check

(a) no import cycle between package modules,
(b) no package-internal import inside a function or method (an import hidden there is how a
    cycle stays alive unnoticed),
(c) every import follows the layer rule (``core`` <- ``field`` <- ``repair``; ``phantom`` on
    ``core``; ``viz`` on ``core``/``field``/``repair``; ``stages`` on everything), and
(d) ``core/config.py`` imports nothing of the package.

Imports under ``if TYPE_CHECKING:`` count too: they are dependencies of the design even when they
do not run. Optional heavy third-party packages (napari, qtpy, torch in modules that must stay light)
may be imported inside functions; they are not package-internal, so the rule does not see them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "nearfix_lib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# which layers each layer may import (its own included)
ALLOWED = {
    "core": {"core"},
    "field": {"core", "field"},
    "repair": {"core", "field", "repair"},
    "phantom": {"core", "phantom"},
    "viz": {"core", "field", "repair", "viz"},
    "stages": {"core", "field", "repair", "phantom", "viz", "stages"},
}
CONFIG = f"{PACKAGE}.core.config"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement loads (a ``from pkg import sub`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        out.append(sub if sub in MODULES else module)
    return out


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every package import of module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, child.lineno, in_function) for target in resolve(name, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return sorted(set(found), key=lambda e: (e[1], e[0]))


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the root package (only __version__)


def where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(ROOT.parent)}:{line}"


GRAPH = {name: imports(name) for name in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module or a self-import."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    out.append(sorted(comp))
    return out


def test_the_package_has_layer_folders():
    assert set(ALLOWED) <= {layer(n) for n in MODULES}, "the layer folders are missing"
    flat = [n for n in MODULES if n != PACKAGE and layer(n) not in ALLOWED]
    assert not flat, f"modules outside a layer folder: {flat}"


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in edges if t in MODULES} for name, edges in GRAPH.items()}
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles between package modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_package_imports_inside_functions():
    hidden = [f"{where(n, line)} imports {t}" for n, edges in GRAPH.items() for t, line, inner in edges if inner]
    assert not hidden, "package-internal imports inside functions:\n" + "\n".join(hidden)


def test_imports_follow_the_layer_rule():
    bad = []
    for name, edges in GRAPH.items():
        own = layer(name)
        for target, line, _ in edges:
            if layer(target) is None:  # the root package: __version__ only
                continue
            if own not in ALLOWED or layer(target) not in ALLOWED[own]:
                bad.append(f"{where(name, line)}: {own or 'root'} imports {target}")
    assert not bad, "imports against the layer rule:\n" + "\n".join(bad)


def test_config_imports_nothing_of_the_package():
    assert CONFIG in MODULES, f"{CONFIG} is missing"
    assert not GRAPH[CONFIG], f"{CONFIG} imports {[t for t, _, _ in GRAPH[CONFIG]]}"


def test_the_root_package_imports_nothing_of_itself():
    assert not GRAPH[PACKAGE]


@pytest.mark.parametrize("module", [CONFIG, f"{PACKAGE}.core.workspace", f"{PACKAGE}.stages.prepare"])
def test_light_modules_do_not_pull_torch_or_the_phantom(module):
    # params, the run folder and prepare are read by viewers and CPU jobs: torch is seconds to import
    code = f"import sys, {module}; print('torch' in sys.modules, '{PACKAGE}.phantom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], f"importing {module} imports torch or the phantom: {out}"
