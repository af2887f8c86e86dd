"""The package's structure: no import cycles (imports inside functions count; only ``if TYPE_CHECKING:`` ones
are exempt), no oversized modules, one reader for every load path, and the lower layers import nothing above
them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_peft"
MAX_LINES = 400

#: modules that form the ground floor: they may import only each other (and the method base class)
GROUND_FLOOR = {
    "lightning_peft.record",
    "lightning_peft.hf",
    "lightning_peft.hf_targets",
    "lightning_peft.targeting",
    "lightning_peft.methods.base",
    "lightning_peft.quantized",  # bitsandbytes layers: read by the methods (DoRA's norm), the model and io
    "lightning_peft.core",
    "lightning_peft.core.bnb_layout",  # bitsandbytes 4-bit layout (AVX512-BF16 CPU packing), under quantized
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere (function bodies included), except under TYPE_CHECKING."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # ``from pkg import submodule`` imports the submodule; ``from pkg import name`` the package
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_are_seen() -> None:
    # the parser must see function-level imports, or the cycle test below could not fail
    assert "lightning_peft.predict" in GRAPH["lightning_peft.cli"]
    assert GRAPH["lightning_peft.io"] >= {"lightning_peft.reader", "lightning_peft.model"}


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_ground_floor_imports_nothing_above_it() -> None:
    for name in GROUND_FLOOR:
        above = GRAPH[name] - GROUND_FLOOR
        assert not above, f"{name} imports {sorted(above)}, which are above the ground floor"


def test_methods_import_no_model_level_module() -> None:
    # methods sit on the ground floor and below model/io/lifecycle: never the other way round
    upper = {n for n in MODULES if not n.startswith("lightning_peft.methods")} - GROUND_FLOOR
    for name in (n for n in MODULES if n.startswith("lightning_peft.methods")):
        assert not GRAPH[name] & upper, f"{name} imports {sorted(GRAPH[name] & upper)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (limit {MAX_LINES}); split it by concern"


def test_one_reader_for_every_load_path() -> None:
    # reading files from disk (torch.load, safetensors load_file/safe_open) happens in reader.py only
    readers = {name for name in MODULES if file_reading_calls(name)}
    assert readers == {"lightning_peft.reader"}


def file_reading_calls(name: str) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(getattr(func, "value", None), "id", "")
            if called in ("load_file", "safe_open") or (called == "load" and owner == "torch"):
                calls.append(called)
    return calls
