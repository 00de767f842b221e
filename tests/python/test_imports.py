"""The package's import graph, read from the source with ast: no cycle, no private name
taken from a sibling module, and ``import cobalance`` without torch."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PACKAGE_PARENT

PACKAGE = Path(PACKAGE_PARENT) / "cobalance"

# Imports made inside a function that point back against the data flow, each with why
# it stays. Such an import runs when the function is called, after both modules are
# loaded, so it closes no cycle at import time; every other edge, module-level or
# function-level, must leave the graph acyclic. The test fails when a listed edge is
# gone or has become a module-level import.
LAZY_BACK_EDGES = {
    # Scans come before tables (MaskScan.to_table imports patterns, lazily too); the
    # PatternTable.from_masks shortcut is public API and needs the scanner.
    ("cobalance.patterns", "cobalance.masks"): "PatternTable.from_masks",
    # The command line registers the experiment subcommand; `python -m
    # cobalance.training` runs it back through cli.main for the one error handling.
    ("cobalance.training.experiment", "cobalance.cli"): "training.experiment.main",
}


def module_names(root: Path) -> dict:
    """Dotted module name -> file, for every module (source or extension) under the package ``root``."""
    names = {}
    for path in sorted(root.rglob("*")):
        # extension modules (_core.cpython-311-x86_64-linux-gnu.so) are modules too
        if path.suffix not in (".py", ".so", ".pyd"):
            continue
        parts = list(path.relative_to(root.parent).parts)
        parts[-1] = parts[-1].split(".")[0]
        if parts[-1] == "__init__":
            parts.pop()
        names.setdefault(".".join(parts), path)
    return names


def _resolve(importer: str, is_package: bool, level: int, module) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, modules: dict):
    """``(target module, imported names or None, function-level?)`` of each import in ``path``
    that reaches a module of the package; ``names`` lists what ``from X import ...`` takes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = {id(node) for node in tree.body}
    # imports under a module-level if/try still run at import time
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            for child in ast.walk(node):
                if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    module_level.add(id(child))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        lazy = id(node) not in module_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.append((alias.name, None, lazy))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node.level, node.module)
            if target not in modules:
                continue
            found.append((target, [alias.name for alias in node.names], lazy))
    return found


def import_graph(root: Path):
    """Edges ``{(importer, imported): lazy}`` (lazy: only inside functions) and the private
    names taken from modules that are not internal, as ``"importer: from X import _y"``."""
    modules = module_names(root)
    edges, private = {}, []
    for name, path in modules.items():
        if path.suffix != ".py":
            continue
        for target, names, lazy in imports_of(name, path, modules):
            reached = []
            for imported in names or []:
                submodule = f"{target}.{imported}"
                if submodule in modules:
                    reached.append(submodule)
                    continue
                # the parent package is always loaded first: only a name taken from it counts
                if not name.startswith(target + "."):
                    reached.append(target)
                internal = target.rsplit(".", 1)[-1].startswith("_")
                dunder = imported.startswith("__") and imported.endswith("__")
                if imported.startswith("_") and not dunder and not internal:
                    private.append(f"{name}: from {target} import {imported}")
            if names is None:
                reached.append(target)
            for target_module in reached:
                if target_module != name:
                    edges[(name, target_module)] = edges.get((name, target_module), True) and lazy
    return edges, private


def find_cycle(edges) -> list:
    """One cycle of the directed graph as a list of nodes (first == last), or []."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


# ---------------------------------------------------------------- the package


def test_no_import_cycle():
    edges, _ = import_graph(PACKAGE)
    assert find_cycle([e for e, lazy in edges.items() if not lazy]) == [], "cycle of module-level imports"
    for edge, why in LAZY_BACK_EDGES.items():
        assert edges.get(edge) is True, f"{edge} ({why}) is no longer a function-level import: update the list"
    rest = [e for e in edges if e not in LAZY_BACK_EDGES]
    assert find_cycle(rest) == [], "cycle of imports (module-level or inside functions)"


def test_no_private_name_from_a_sibling_module():
    _, private = import_graph(PACKAGE)
    assert private == []


def test_dice_core_and_numpy_front_end_import_no_torch():
    code = (
        "import sys\n"
        "import cobalance.metrics, cobalance._dice\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kornia')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE_PARENT)})
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the checks themselves


def _package(tmp_path, files: dict) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checks_find_a_lazy_cycle_and_private_names(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from .a import A\n",
        "a.py": "from . import _ext\nfrom ._shared import _ok, helper\nfrom .b import _hidden\nA = 1\n",
        "b.py": "def f():\n    from .sub import c\n_hidden = 2\n",
        "_shared.py": "_ok = helper = 3\n",
        "sub/__init__.py": "",
        "_ext.cpython-311-x86_64-linux-gnu.so": "",
        "sub/c.py": "import pkg.a\nfrom .. import _shared\nfrom ..b import __doc__\n",
    })
    edges, private = import_graph(root)
    assert private == ["pkg.a: from pkg.b import _hidden"]
    assert edges[("pkg.b", "pkg.sub.c")] is True and edges[("pkg.a", "pkg.b")] is False
    assert ("pkg.sub.c", "pkg") not in edges and ("pkg.sub.c", "pkg._shared") in edges
    module_level = [e for e, lazy in edges.items() if not lazy]
    assert find_cycle(module_level) == []
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


@pytest.mark.parametrize("guard", ["if True", "try"])
def test_imports_under_a_module_level_block_run_at_import_time(tmp_path, guard):
    body = "    from .b import x\n" + ("except ImportError:\n    pass\n" if guard == "try" else "")
    root = _package(tmp_path, {"__init__.py": "", "a.py": f"{guard}:\n{body}", "b.py": "x = 1\n"})
    edges, _ = import_graph(root)
    assert edges == {("pkg.a", "pkg.b"): False}
