"""The layers of docs/architecture.md import downward only, and aioti's modules form no import
cycle (imports made only for type checking, under `if TYPE_CHECKING:`, do not count: they never
run)."""

from __future__ import annotations

import ast
from pathlib import Path

import aioti

ROOT = Path(aioti.__file__).parent

#: layer of each module by its dotted name's first part below `aioti`; the facade is the rest
LAYERS = {"errors": 0, "core": 1, "loops": 1, "backends": 2, "runtime": 3}  # serving: facade
FACADE = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], FACADE) if len(parts) > 1 else FACADE


def top(name: str) -> str:
    """The part below `aioti` ("" for the package itself)."""
    return name.split(".")[1] if "." in name else ""


def imports(path: Path) -> set[str]:
    """aioti modules `path` imports at run time (module-level or in functions)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aioti")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("aioti"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (ROOT.parent / sub.replace(".", "/")).is_dir() else target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def test_layers_import_downward_only():
    wrong = []
    for mod, deps in graph().items():
        for dep in deps:
            side_by_side = {top(mod), top(dep)} == {"core", "loops"}
            if layer(dep) > layer(mod) or side_by_side:
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, f"imports against the layers: {wrong}"


def test_no_import_cycle():
    g = graph()
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for dep in g.get(node, ()):
            if seen.get(dep) == 1:
                cycle.extend(stack[stack.index(dep):] + [dep])
                return
            if dep not in seen:
                visit(dep, stack + [dep])
                if cycle:
                    return
        seen[node] = 2

    for node in sorted(g):
        if node not in seen:
            visit(node, [node])
        assert not cycle, f"import cycle: {' -> '.join(cycle)}"
