"""The architecture, checked: imports follow the data flow, no private name crosses modules, functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xraydeconv"

# data flow: a module may import from its own stage or an earlier one, never a later one
STAGES = {"errors": 0, "io": 0, "device": 0, "ops": 1, "nn": 1, "data": 2, "training": 3, "explain": 4,
          "metrics": 5, "reports": 6, "cli": 7}
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _stage(dotted: str) -> int | None:
    parts = dotted.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 and parts[0] == "xraydeconv" else None


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every absolute import of the package."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return [(m, names, line) for m, names, line in out if m.split(".")[0] == "xraydeconv"]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_data_flow(path: Path) -> None:
    own = _stage(_name(path))
    tree = ast.parse(path.read_text())
    for module, names, line in _imports(tree):
        targets = [module] + [f"{module}.{n}" for n in names if module == "xraydeconv"]
        for target in targets:
            stage = _stage(target)
            assert stage is None or own is None or stage <= own, f"{path.name}:{line} imports {target} (later stage)"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_modules(path: Path) -> None:
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xraydeconv"):
            for a in node.names:
                assert not a.name.startswith("_"), f"{path.name}:{node.lineno} imports {a.name} from {node.module}"
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("xraydeconv")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            raise AssertionError(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over the limit:\n" + "\n".join(long)


def test_the_stages_exist() -> None:
    # a renamed subpackage must be renamed here too, or the checks above would silently pass it
    found = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", "."))}
    assert set(STAGES) <= found
