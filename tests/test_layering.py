"""The package's layering (README "Development"): every import, inside functions too, points down or sideways
within a layer, and no modules import each other in a cycle. Type-only imports (under TYPE_CHECKING) are left
out: they run nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_rl"

# Top to bottom; a module may import its own layer or any layer below.
LAYERS = (
    ("lora_rl.cli", "lora_rl.__main__"),
    ("lora_rl.commands",),
    ("lora_rl.rl",),
    ("lora_rl.adapters",),
    ("lora_rl.models",),
    ("lora_rl.training",),
    ("lora_rl.recipe", "lora_rl.data", "lora_rl.display", "lora_rl.builtin", "lora_rl.demo_rewards",
     "lora_rl.math_rewards", "lora_rl"),
)


def module_names() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer(module: str) -> int:
    """The index of the most specific entry of LAYERS that `module` is or lies under."""
    matches = [(len(entry), index) for index, entries in enumerate(LAYERS) for entry in entries
               if module == entry or module.startswith(entry + ".")]  # fmt: skip
    assert matches, f"{module} is in no layer: add it to LAYERS and to the README's table"
    return max(matches)[1]


def runtime_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The lora_rl modules `path` imports at run time (at the top or inside functions)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lora_rl"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_rl"):
            for alias in node.names:  # `from lora_rl.training import checkpoint` imports a module
                inner = f"{node.module}.{alias.name}"
                found.add(inner if inner in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: runtime_imports(path, modules) - {name} for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
            for module, targets in graph.items() for target in targets if layer(target) < layer(module)]  # fmt: skip


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle found by a depth-first walk, as "a -> b -> a"."""
    found, done = [], set()

    def visit(path: list[str]) -> None:
        for target in sorted(graph.get(path[-1], ())):
            if target in path:
                found.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(path + [target])
        done.add(path[-1])

    for module in sorted(graph):
        if module not in done:
            visit([module])
    return found


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_modules_import_each_other_in_a_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: a function-level upward import and a cycle, written as source, are found."""
    modules = {"lora_rl.training.a": tmp_path / "a.py", "lora_rl.commands.b": tmp_path / "b.py"}
    (tmp_path / "a.py").write_text("def f():\n    from lora_rl.commands import b\n")
    (tmp_path / "b.py").write_text("from lora_rl.training import a\n")
    graph = {name: runtime_imports(path, modules) for name, path in modules.items()}
    assert upward_imports(graph) == ["lora_rl.training.a (layer 5) imports lora_rl.commands.b (layer 1)"]
    assert cycles(graph) == ["lora_rl.commands.b -> lora_rl.training.a -> lora_rl.commands.b"]


def test_type_only_imports_are_not_counted(tmp_path):
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lora_rl.models.build import X\n"
    (tmp_path / "m.py").write_text(source)
    assert runtime_imports(tmp_path / "m.py", {}) == set()


def test_every_subpackage_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, f"{init} needs a docstring saying what lives there and what it may import"


def test_help_imports_no_torch():
    code = "import sys; from lora_rl.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
