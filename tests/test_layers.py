"""The package layout is the data flow: no module imports from a layer above its own, and no two
modules import each other, even through others or inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "selfreplay"

# lowest first: a package may import from its own layer and those before it
LAYERS = [
    {"errors", "runtime", "config", "rundir", "__init__"},
    {"data"}, {"model"}, {"replay"}, {"objective"}, {"evaluation"},
    {"families"},  # the two model families side by side: the built-in Transformer and Hugging Face's
    {"training"},  # the replay run and the command line's loop around it
    {"hf"},  # the Trainer: a front end over the same replay run
    {"experiments"},
    {"cli", "__main__"},  # the command line, and `python -m selfreplay` that runs it
]


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every selfreplay module and the selfreplay modules it imports anywhere in its body."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfreplay"):
                for alias in node.names:  # `from selfreplay.x import y` may import the module x.y
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("selfreplay")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_every_package_has_a_layer():
    for name in imports():
        assert layer(name) is not None, name


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [(name, target) for name, targets in imports().items() for target in targets if layer(target) > layer(name)]
    assert not upward, upward


def test_no_import_cycle():
    graph = imports()
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(target):] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
