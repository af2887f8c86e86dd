"""The package's structure: its folders are layers, and a module imports only from its own folder and the folders
below it (imports inside functions count; only ``if TYPE_CHECKING:`` ones are exempt); three sibling folders do
not import each other; no import cycles, no oversized modules, one reader for every load path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_peft"
MAX_LINES = 400

#: the package's folders, bottom to top: each may import only the folders before it (and its own modules). A
#: set is one level of siblings, which may not import each other.
LAYERS: list[str | frozenset[str]] = [
    "core",  # what a model carries and how modules are found: record, targeting, base model, bitsandbytes
    "methods",  # one module per PEFT method, behind PEFTMethod / PEFTLayer and the registry
    "ops",  # operations on an adapted model: attach, parameters, state dict, routing, merging, named adapters
    "distributed",  # strategies: DDP, FSDP, activation checkpointing
    "files",  # adapters on disk: reader, save, load, checks, fingerprint, Hub, HF PEFT key names
    frozenset({"lightning", "combine", "inference"}),  # Lightning integration; combining adapters; using one
    "tasks",  # task recipes (data, training loops) built on the layers below
    "cli",  # the lightning-peft commands
]
#: modules at the package root besides ``__init__``: leaves that import nothing from the package
ROOT_LEAVES = {"version", "library_noise", "packaged_models"}


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
    return {m for m in imports_in(MODULES[name], name) if m in MODULES}


def imports_in(path: Path, name: str) -> set[str]:
    """Package modules that the file ``path`` (module ``name``) imports anywhere (function bodies included),
    except under TYPE_CHECKING. A module not in the package is kept when it is named ``lightning_peft...``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
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
    return {m for m in found if (m in MODULES or m.startswith("lightning_peft.")) and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def level_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module``'s folder; ``-1`` for a root leaf, ``None`` for the root."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if len(parts) == 2 and parts[1] in ROOT_LEAVES:
        return -1
    for index, layer in enumerate(LAYERS):
        if parts[1] == layer or (isinstance(layer, frozenset) and parts[1] in layer):
            return index
    raise AssertionError(f"{module} is in a folder that LAYERS does not place; add it there")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs upward, sideways between sibling folders, or from a root leaf into the package."""
    found = []
    for module, imported in sorted(graph.items()):
        level = level_of(module)
        if level is None:  # the package's __init__ re-exports the public API from every layer
            continue
        folder = module.split(".")[1]
        for target in sorted(imported):
            target_level = level_of(target)
            if level == -1 and target_level is not None:
                found.append(f"{module} (a root leaf) imports {target}")
            elif target_level is None or target_level == -1:
                continue  # the root leaves serve every layer
            elif target_level > level:
                found.append(f"{module} imports {target}, which is in a layer above it")
            elif target_level == level and target.split(".")[1] != folder:
                found.append(f"{module} imports {target}: sibling folders may not import each other")
    return found


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
    assert "lightning_peft.cli.classify" in GRAPH["lightning_peft.cli"]  # imported inside _classify_main
    assert GRAPH["lightning_peft.files.load"] >= {
        "lightning_peft.files.reader",
        "lightning_peft.ops.named_adapters",
    }


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_every_import_runs_downward() -> None:
    assert layer_violations(GRAPH) == []


def test_the_layer_checker_finds_upward_and_sideways_imports() -> None:
    graph = {
        "lightning_peft.core.record": {"lightning_peft.ops.attach"},  # up
        "lightning_peft.ops.attach": {"lightning_peft.core.record", "lightning_peft.version"},  # fine
        "lightning_peft.combine.folders": {"lightning_peft.lightning.lifecycle"},  # sideways
        "lightning_peft.inference.pipeline": {
            "lightning_peft.files.load",
            "lightning_peft.inference.rebuild",
        },
        "lightning_peft.version": {"lightning_peft.core.record"},  # a leaf that is not one
        "lightning_peft": {"lightning_peft.cli"},
    }
    assert layer_violations(graph) == [
        "lightning_peft.combine.folders imports lightning_peft.lightning.lifecycle: sibling folders may not "
        "import each other",
        "lightning_peft.core.record imports lightning_peft.ops.attach, which is in a layer above it",
        "lightning_peft.version (a root leaf) imports lightning_peft.core.record",
    ]
    with pytest.raises(AssertionError, match="LAYERS does not place"):
        layer_violations({"lightning_peft.newfolder.x": set()})


def test_an_upward_import_inside_a_function_is_found(tmp_path: Path) -> None:
    # a real module file, parsed as the suite parses the package: the import hides in a function body
    module = tmp_path / "record.py"
    module.write_text(
        "def f():\n    from lightning_peft.ops.attach import apply_peft\n    return apply_peft\n"
    )
    imported = imports_in(module, "lightning_peft.core.record")
    assert imported == {"lightning_peft.ops.attach"}
    assert layer_violations({"lightning_peft.core.record": imported}) != []


def test_every_folder_is_a_layer_and_the_root_holds_only_leaves() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    placed = {f for layer in LAYERS for f in ([layer] if isinstance(layer, str) else layer)}
    assert folders <= placed, f"folders missing from LAYERS: {sorted(folders - placed)}"
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root <= ROOT_LEAVES, (
        f"modules at the package root that are not leaves: {sorted(root - ROOT_LEAVES)}"
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (limit {MAX_LINES}); split it by concern"


def test_one_reader_for_every_load_path() -> None:
    # reading files from disk (torch.load, safetensors load_file/safe_open) happens in files/reader.py only
    readers = {name for name in MODULES if file_reading_calls(name)}
    assert readers == {"lightning_peft.files.reader"}


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
