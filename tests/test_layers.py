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

# The only imports allowed inside a function: those of an optional dependency, so that `import selfreplay` and
# the built-in command line run without it, and those of a selfreplay module that imports one at its top.
# Every other import sits at the top of its module, where the graph below sees the data flow.
OPTIONAL = {
    "transformers": "the hf extra",
    "peft": "the hf extra",
    "datasets": "the hf extra",
    "gguf": "the hf extra (init=hf:FILE.gguf)",
    "lm_eval": "the eval extra (lm-eval)",
    "submitit": "the cluster extra",
    "matplotlib": "a base dependency, but only the figures draw: they choose the Agg backend before pyplot loads",
    "selfreplay.hf.trainer": "imports transformers at its top",
}


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, name: str, path: Path, modules) -> set[str]:
    """The modules one import statement in module `name` (read from `path`) names: `from x import y` names the
    module x.y where there is one, else x; a relative import is resolved against the importing module's package
    (an `__init__.py` is its package itself)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of the package at `root` and the package's modules it imports anywhere in its body."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= imported(node, name, path, modules)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(name, target) for name, targets in sorted(graph.items()) for target in sorted(targets)
            if layer(target) > layer(name)]


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle found, as the path of modules around it; None when there is none."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_every_package_has_a_layer():
    for name in imports():
        assert layer(name) is not None, name


def test_no_module_imports_from_a_layer_above_its_own():
    upward = upward_imports(imports())
    assert not upward, upward


def test_no_import_cycle():
    cycle = import_cycle(imports())
    if cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle)}")


FAKE = {  # a package laid out as selfreplay is, that imports only relatively
    "__init__.py": "",
    "errors.py": "",
    "config.py": "from . import errors\n",
    "model/__init__.py": "from .transformer import Transformer\n",
    "model/transformer.py": "from ..config import errors\n\n\ndef train():\n    from ..training.loop import run\n",
    "training/__init__.py": "",
    "training/loop.py": "from ..model import transformer\n",
}


@pytest.fixture
def fake(tmp_path) -> Path:
    root = tmp_path / "fake"
    for name, text in FAKE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_relative_imports_count(fake):
    graph = imports(fake)  # the function the tests above run on selfreplay
    assert graph == {
        "fake": set(),
        "fake.errors": set(),
        "fake.config": {"fake.errors"},  # level 1 in a module: its package
        "fake.model": {"fake.model.transformer"},  # level 1 in an __init__.py: the package itself
        "fake.model.transformer": {"fake.config", "fake.training.loop"},  # level 2: the package's parent
        "fake.training": set(),
        "fake.training.loop": {"fake.model.transformer"},  # `from ..p import m` where p.m is a module
    }
    assert upward_imports(graph) == [("fake.model.transformer", "fake.training.loop")]
    assert import_cycle(graph) == ["fake.model.transformer", "fake.training.loop", "fake.model.transformer"]


def in_functions(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports inside a function's or method's body, nested ones included, each once."""
    found = {}
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found[id(node)] = node
    return sorted(found.values(), key=lambda node: node.lineno)


def allowed(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in OPTIONAL)


def test_imports_inside_functions_are_only_optional_dependencies():
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    hidden = []
    for name, path in sorted(modules.items()):
        for node in in_functions(ast.parse(path.read_text())):
            if not all(allowed(m) for m in imported(node, name, path, modules)):
                hidden.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {ast.unparse(node)}")
    if hidden:
        pytest.fail("imports inside functions that belong at the top of their module (only an optional dependency "
                    "named in OPTIONAL may wait for its function):\n" + "\n".join(hidden), pytrace=False)


def test_each_selfreplay_module_allowed_inside_functions_imports_an_optional_dependency_at_its_top():
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}

    def at_top(name: str) -> set[str]:
        tree = ast.parse(modules[name].read_text())
        inside = {id(node) for node in in_functions(tree)}
        return {m for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside
                for m in imported(node, name, modules[name], modules)}

    def pulls_in_optional(name: str, seen: set[str]) -> bool:
        seen.add(name)
        return any(m not in modules and allowed(m) or m in modules and m not in seen and pulls_in_optional(m, seen)
                   for m in at_top(name))

    for name in OPTIONAL:
        if name.split(".")[0] == ROOT.name:
            assert name in modules and pulls_in_optional(name, set()), name
