"""The package's layers point one way: read from the sources' import statements, so a circle or
an upward import fails here whichever order the modules happen to be imported in."""

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arbor_titan"
# The trainer's side: the loop and the hooks it runs. The distributed layer serves it and must
# not know it (not even for type hints), or trainer -> build -> distributed -> trainer circles.
TRAINER_SIDE = ("arbor_titan.trainer", "arbor_titan.callbacks", "arbor_titan.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, package: str) -> set[str]:
    """Every module an import statement under `node` names (relative imports resolved)."""
    names = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            names.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:
                anchor = package.split(".")[: len(package.split(".")) - item.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in item.names)
    return names


def load_time_imports(name: str) -> set[str]:
    """The package modules `name` imports when it is loaded: module-level statements, not those
    inside functions or under `if TYPE_CHECKING:`."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for statement in tree.body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        found |= imported(statement, package)
    return {m for m in found if m in MODULES and m != name}


def test_distributed_layer_knows_nothing_of_the_trainer():
    upward = {
        f"{path.name} imports {name}"
        for path in sorted((PACKAGE / "distributed").glob("*.py"))
        for name in imported(ast.parse(path.read_text()), "arbor_titan.distributed")
        if name.startswith(TRAINER_SIDE)
    }
    assert not upward, sorted(upward)


def test_no_import_circle():
    graph = {name: load_time_imports(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_module_imports():
    for name in sorted(MODULES):
        importlib.import_module(name)
