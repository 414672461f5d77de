"""The shape of the package: no import cycles, no upward imports of command modules, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent


def _imports() -> dict[str, set[str]]:
    """module -> the lorakit modules it imports, at module level and inside functions."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .x import y
                    found.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x
                    found.update(a.name for a in node.names)
                elif node.module and node.module.startswith("lorakit."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lorakit."))
        graph[name] = {m for m in found if (PACKAGE / f"{m}.py").is_file() and m != name}
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
    assert {"checkpoints", "models", "data"} <= graph["train"]  # function-level imports are seen too
    assert "plan" in graph["train"] and "trainer" in graph["train"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_shared_layers_import_no_command_module():
    """The low modules every command reads never import a command module."""
    commands = {
        "train",
        "generate",
        "merge",
        "export",
        "evaluate",
        "chat",
        "serve",
        "sweep",
        "plan",
        "doctor",
        "demo",
        "dashboard",
    }
    low = [
        "config",
        "errors",
        "io",
        "data",
        "datacache",
        "models",
        "adapter",
        "checkpoints",
        "pretokenizer",
        "families",
        "loss",
        "rundir",
    ]
    graph = _imports()
    for module in low:
        assert not graph[module] & commands, f"{module} imports {graph[module] & commands}"


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.stem}.{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_functions_are_short():
    lengths = _function_lengths()
    [train_len] = [n for k, n in lengths.items() if k.startswith("train.train:")]
    assert train_len <= 60, f"train() is {train_len} lines"
    long = {k: n for k, n in lengths.items() if n > 120}
    assert not long, f"functions over 120 lines: {long}"
