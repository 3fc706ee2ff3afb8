"""Import direction, read from the source with ast (every import, lazy ones included):

    pacs_embed (the command line and the composition root)
      -> dicom_listener, workers, emulator -> pipeline

``pipeline`` imports none of the others, ``dicom_listener`` and ``workers`` do not import
``pacs_embed``; no module imports itself through others, nor does a part of ``pipeline`` (a
subpackage such as ``pipeline.detect``, or a top-level module).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pacs_embed", "dicom_listener", "workers", "emulator", "pipeline")

#: package -> top-level packages of ours it must never import.
FORBIDDEN = {
    "pipeline": {"pacs_embed", "workers", "dicom_listener", "emulator"},
    "dicom_listener": {"pacs_embed"},
    "workers": {"pacs_embed"},
}

#: Cycles between pipeline's parts that are known and being removed, as sorted tuples (the
#: detect <-> store cycle of issue 9 is gone: pipeline.store now imports pipeline.verdicts).
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, *, type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth (lazy ones included); with
    ``type_checking`` False, not those under ``if TYPE_CHECKING:``, which never run."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _import_nodes(child, type_checking=type_checking)


def imports(module: str, *, type_checking: bool = True) -> set[str]:
    """The modules (ours or not) that ``module`` imports, resolved to the deepest module: ``from
    pipeline.detect import transfer`` is ``pipeline.detect.transfer``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text()), type_checking=type_checking):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in MODULES else base)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    """Lower layers never import higher ones (not even lazily or for typing)."""
    wrong = {
        f"{module} imports {target}"
        for module in MODULES
        if module.split(".")[0] == package
        for target in imports(module)
        if target.split(".")[0] in FORBIDDEN[package]
    }
    assert not wrong, sorted(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _graph(unit: Callable[[str], str]) -> dict[str, set[str]]:
    """Who imports whom at run time (imports under TYPE_CHECKING aside), between ``unit``s."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = imports(module, type_checking=False)
        graph.setdefault(unit(module), set()).update(
            unit(t) for t in targets if t in MODULES and unit(t) != unit(module)
        )
    return graph


def test_no_import_cycles() -> None:
    """Our modules form a DAG; and so do pipeline's parts (``pipeline.detect`` as one, with all
    its modules, ``pipeline.store`` as another): neither a module nor a subpackage depends on
    itself through others."""
    assert _cycles(_graph(lambda module: module)) == []
    parts = _graph(lambda module: ".".join(module.split(".")[:2]))
    pipeline = {
        part: targets for part, targets in parts.items() if part.split(".")[0] == "pipeline"
    }
    assert set(_cycles(pipeline)) <= KNOWN_CYCLES


def test_the_cycle_finder_finds_cycles() -> None:
    """The check above would see a cycle, and resolves relative and package imports."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [("a", "b", "c")]
    assert "pipeline.detect.transfer" in imports("pacs_embed.verdict_commands")
    assert "pipeline.admin.status" in imports("pacs_embed.compose")  # a lazy import counts
