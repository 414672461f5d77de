"""The shape of the package: no import cycles, no upward imports of command modules, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted names inside the package ("training.train") -> their files."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _imports() -> dict[str, set[str]]:
    """module -> the lorakit modules it imports, at module level and inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".")[: -1 if path.name != "__init__.py" else None]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("lorakit"):
                    prefix = node.module.removeprefix("lorakit").lstrip(".")
                else:
                    continue
                # `from .pkg import module` names a module; `from .module import name` does not
                targets = [f"{prefix}.{a.name}".lstrip(".") for a in node.names] + [prefix]
            elif isinstance(node, ast.Import):
                targets = [
                    a.name.removeprefix("lorakit.") for a in node.names if a.name.startswith("lorakit.")
                ]
            for target in targets:
                if target in modules and target != name:
                    found.add(target)
                    break
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = _imports()
    train = graph["training.train"]  # function-level imports are seen too
    assert {"training.checkpoints", "models.loading", "data.encode", "training.trainer"} <= train
    assert "planning.memory" in train or "planning.plan" in train
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_subpackages_form_no_cycle_either():
    """The stages as packages: `core` below everything, no two packages importing each other."""
    packages: dict[str, set[str]] = {}
    for module, imported in _imports().items():
        top = module.split(".")[0]
        packages.setdefault(top, set()).update(m.split(".")[0] for m in imported if m.split(".")[0] != top)
    subpackages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert len(subpackages) >= 5, subpackages
    assert not packages["core"] & subpackages, packages["core"]
    cycle = _cycle({k: v & subpackages for k, v in packages.items() if k in subpackages})
    assert cycle is None, " -> ".join(cycle)


COMMANDS = {
    "training.train",
    "inference.generate",
    "export.merge",
    "export.targets",
    "workflows.evaluate",
    "inference.chat",
    "inference.serve",
    "workflows.sweep",
    "planning.plan",
    "data.doctor",
    "workflows.demo",
    "ui.dashboard",
}


def test_shared_layers_import_no_command_module():
    """The low modules every command reads never import a command module."""
    graph = _imports()
    low = [m for m in graph if m.split(".")[0] in ("core", "data", "models") and m not in COMMANDS]
    low += ["training.checkpoints", "training.loss", "training.batching", "export.families", "ui.rundir"]
    assert len(low) > 15
    for module in low:
        assert not graph[module] & COMMANDS, f"{module} imports {graph[module] & COMMANDS}"


def _sizes() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Lines of every module, class and function."""
    modules, classes, functions = {}, {}, {}
    for name, path in _modules().items():
        text = path.read_text()
        modules[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                classes[f"{name}.{node.name}:{node.lineno}"] = size
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{name}.{node.name}:{node.lineno}"] = size
    return modules, classes, functions


def test_modules_classes_and_functions_are_short():
    modules, classes, functions = _sizes()
    [train_len] = [n for k, n in functions.items() if k.startswith("training.train.train:")]
    assert train_len <= 60, f"train() is {train_len} lines"
    assert not {k: n for k, n in modules.items() if n > 700}, "modules over 700 lines"
    assert not {k: n for k, n in classes.items() if n > 300}, "classes over 300 lines"
    assert not {k: n for k, n in functions.items() if n > 100}, "functions over 100 lines"


def test_the_ignore_label_is_written_once():
    """-100 (the label that carries no loss) appears in code once: core.labels.IGNORE_INDEX."""
    places = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.UnaryOp)
                and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant)
                and node.operand.value == 100
            ):
                places.append(f"{name}:{node.lineno}")
    assert len(places) == 1 and places[0].startswith("core.labels:"), places
