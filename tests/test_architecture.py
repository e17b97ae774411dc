"""The layout docs/ARCHITECTURE.md promises: no import cycle, stages import downwards, no test hooks in the
package."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from aptos_ray.config import Config

PACKAGE = Path(__file__).resolve().parents[1] / "aptos_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of the file)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aptos_ray"):
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_lower_stages_do_not_import_higher_ones():
    graph = import_graph()
    rules = {"aptos_ray.data": ("aptos_ray.train", "aptos_ray.tune", "aptos_ray.infer"),
             "aptos_ray.model": ("aptos_ray.data", "aptos_ray.train", "aptos_ray.tune", "aptos_ray.infer"),
             "aptos_ray.train": ("aptos_ray.tune", "aptos_ray.infer")}
    wrong = [(m, t) for m, targets in graph.items() for stage, banned in rules.items() if m.startswith(stage)
             for t in targets if t.startswith(banned)]
    assert not wrong, wrong


def test_config_has_no_test_hooks():
    names = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory())}
    hooks = [n for n in names if any(word in n for word in ("fail_at", "inject", "for_tests", "debug_"))]
    assert not hooks and "scaling.max_failures" in names  # the words are found where they exist


def test_model_section_defaults_are_the_default_recipe():
    assert Config().model == type(Config().model)()  # one source of truth for the recipe
