"""The package's module-level imports form no cycle (imports inside functions, made lazily so that `--help`
needs no torch, are not part of the graph: they run after every module has loaded)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "cli":  # installed as moegpt.cli
        parts = ["moegpt", "cli", *parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moegpt") and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("moegpt")}
    return names


def import_graph() -> dict[str, set[str]]:
    files = [*(ROOT / "moegpt").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    modules = {module_name(path): top_level_imports(path) for path in files}
    return {name: {dep for dep in deps if dep in modules and dep != name} for name, deps in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_imports_no_moe_and_no_torch():
    deps = import_graph()["moegpt.config"]
    assert not any(dep.startswith("moegpt.moe") for dep in deps)
    assert "import torch" not in (ROOT / "moegpt" / "config.py").read_text()
