"""The folders are the layers: imports run one way (connectors <- store <- load <- driver <- entry points and
engines), lazy imports inside functions included, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raydist_loader"

#: the base modules (top level) and the layer folders, bottom to top; testing/ is an aside (nothing imports it)
BASE = {"errors", "redact", "pool", "bulk", "digest", "dtypes", "retry", "options", "report", "validation"}
ENTRY = {"api", "cli", "config", "__init__", "__main__"}
RANK = {"base": 0, "connectors": 1, "store": 2, "load": 3, "driver": 4, "entry": 5, "engines": 5, "testing": 99}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package (``pkg.store.plan`` -> ``store``)."""
    parts = module.split(".")[1:] or ["__init__"]
    if len(parts) > 1 or parts[0] in RANK:
        return parts[0]
    if parts[0] in BASE:
        return "base"
    if parts[0] in ENTRY:
        return "entry"
    raise AssertionError(f"{module}: a top-level module that is neither a base module nor an entry point: "
                         "put it in its layer folder (or list it here)")


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every package module ``path`` imports, at the top or inside a function (resolved to module names)."""
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import held` names a module, `from .x import f` a name in x
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != me}


def graph(root: Path) -> dict[str, set[str]]:
    return {module_name(root, p): imports_of(root, p) for p in sorted(root.rglob("*.py"))}


def upward(root: Path) -> list[str]:
    """Imports that point to a higher layer (testing/ may import anything and is checked elsewhere)."""
    bad = []
    for mod, deps in graph(root).items():
        if layer_of(mod) == "testing":
            continue
        for dep in sorted(deps):
            if layer_of(dep) == "testing":
                continue  # tests/test_security.py: no product module imports testing/
            if RANK[layer_of(dep)] > RANK[layer_of(mod)]:
                bad.append(f"{mod} ({layer_of(mod)}) imports {dep} ({layer_of(dep)})")
    return bad


def cycles(root: Path) -> list[list[str]]:
    """Import circles (each found once, from its first module in sorted order)."""
    edges = graph(root)
    found, done = [], set()

    def visit(mod: str, stack: list[str]) -> None:
        for dep in sorted(edges.get(mod, ())):
            if dep in stack:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(mod)

    for mod in sorted(edges):
        if mod not in done:
            visit(mod, [mod])
    return found


def test_imports_run_down_the_layers():
    assert upward(PACKAGE) == []


def test_no_import_circles_lazy_imports_included():
    assert cycles(PACKAGE) == []


def test_every_top_level_module_is_base_or_entry_point():
    for path in PACKAGE.glob("*.py"):
        layer_of(module_name(PACKAGE, path))  # raises naming a module that belongs in a folder


@pytest.mark.parametrize("lazy", [False, True])
def test_the_check_catches_an_upward_import(tmp_path, lazy):
    root = tmp_path / "raydist_loader"
    for folder in ("store", "driver"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "driver" / "coordinator.py").write_text("from ..store import plan\n")
    body = "from ..driver.coordinator import Coordinator\n"
    if lazy:
        body = "def f():\n    " + body
    (root / "store" / "plan.py").write_text(body)
    assert upward(root) == ["raydist_loader.store.plan (store) imports raydist_loader.driver.coordinator (driver)"]
    assert cycles(root) == [["raydist_loader.driver.coordinator", "raydist_loader.store.plan",
                             "raydist_loader.driver.coordinator"]]
