"""Imports point one way: cli → ops → adapters → io / math → names / errors (issue 11).

The floors are read from the package's folders, so a new module is checked as soon as it exists. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deltakit"

# Lower number = lower floor. A module may import from a strictly lower floor, or from its own folder.
FLOORS = {
    "deltakit.errors": 0,
    "deltakit.names": 0,
    "deltakit.defaults": 0,
    "deltakit.io": 1,
    "deltakit.math": 1,
    "deltakit.adapters": 2,
    "deltakit.ops": 3,
    "deltakit.cli": 4,
    "deltakit.__main__": 5,
    "deltakit": 5,  # __init__: the public API re-exports from every floor
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str:
    """The floor key a module belongs to: its sub-package, or itself for a top-level module."""
    parts = module.split(".")
    key = ".".join(parts[:2])
    return key if key in FLOORS else "deltakit"


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    package = _module_name(path)
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deltakit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("deltakit"):
                found.add(module)
                # `from deltakit.io import hub` imports the module deltakit.io.hub
                found.update(f"{module}.{a.name}" for a in node.names
                             if (PACKAGE.parent / f"{module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
    return found


def _edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        edges.extend((source, target) for target in sorted(_runtime_imports(path)) if target != source)
    return edges


def _breaks_layering(source: str, target: str) -> bool:
    source_group, target_group = _group(source), _group(target)
    if source_group == "deltakit":
        return False
    if target in ("deltakit", "deltakit.io", "deltakit.math", "deltakit.adapters", "deltakit.ops"):
        return False  # a package's __init__ holds nothing
    if source_group == target_group:
        return False
    return FLOORS[target_group] >= FLOORS[source_group]


def test_every_import_points_to_a_lower_floor() -> None:
    wrong = [f"{s} -> {t}" for s, t in _edges() if _breaks_layering(s, t)]
    assert not wrong, "imports that run sideways or upward:\n" + "\n".join(wrong)


# What a user runs. One operation never imports another (shared pieces live on a lower floor); batch runs them all.
OPERATIONS = {"deltakit.ops.extract", "deltakit.ops.merge", "deltakit.ops.stack", "deltakit.ops.inspect"}


def test_operations_do_not_import_each_other() -> None:
    wrong = [f"{s} -> {t}" for s, t in _edges() if s in OPERATIONS and t in OPERATIONS]
    assert not wrong, "operations importing operations:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for source, target in _edges():
        if target.count(".") >= 2 or target in ("deltakit.errors", "deltakit.names", "deltakit.cli"):
            graph.setdefault(source, set()).add(target)
    seen: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state = seen.get(node)
        if state == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state == 2:
            return
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        seen[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_checker_sees_a_violation() -> None:
    """The rule itself can fail: io importing ops, or math importing io, is caught."""
    assert _breaks_layering("deltakit.io.writer", "deltakit.ops.report")
    assert _breaks_layering("deltakit.math.ranks", "deltakit.io.checkpoint")
    assert _breaks_layering("deltakit.adapters.layers", "deltakit.ops.plan")
    assert not _breaks_layering("deltakit.ops.merge", "deltakit.adapters.layers")
    assert ("deltakit.cli", "deltakit.errors") in _edges()


# Shared pieces of the operations: an operation may import them, they import no operation.
SHARED_OPS = {"deltakit.ops.plan", "deltakit.ops.report", "deltakit.ops.receipt", "deltakit.ops.delta",
              "deltakit.ops.plots"}


def test_shared_ops_pieces_import_no_operation() -> None:
    wrong = [f"{s} -> {t}" for s, t in _edges() if s in SHARED_OPS and t in OPERATIONS | {"deltakit.ops.batch"}]
    assert not wrong, "shared ops modules importing operations:\n" + "\n".join(wrong)


def _variant_tests(source: str, where: str) -> list[str]:
    """Places that tell adapter variants apart by name: ``.use_dora``, or a comparison with a variant's name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "use_dora":
            found.append(f"{where}:{node.lineno}: .use_dora")
        elif isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Constant) and str(side.value).lower() in ("lora", "dora", "use_dora")
                for side in [node.left, *node.comparators]):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_operations_never_test_a_variant_by_name() -> None:
    """LoRA and DoRA differ only behind adapters/variants.py's interface (issue 11)."""
    modules = OPERATIONS | SHARED_OPS
    paths = [PACKAGE.parent / (m.replace(".", "/") + ".py") for m in sorted(modules)]
    found = [hit for path in paths for hit in _variant_tests(path.read_text(), path.name)]
    assert not found, "variant tests by name:\n" + "\n".join(found)
    assert len(_variant_tests('if step.op == "dora" or adapter.use_dora:\n    pass\n', "sample")) == 2
