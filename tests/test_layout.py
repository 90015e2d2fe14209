"""The package's shape: no import circle, imports pointing one way, no module too long to read in one sitting."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "sculpt"
# what each part of sculpt may import of sculpt (docs/ARCHITECTURE.md)
ALLOWED = {
    "annotation": set(),
    "errors": set(),
    "schema": {"annotation"},
    "io": {"annotation", "schema", "errors"},
    "models": {"annotation", "errors"},
    "stage": {"errors", "schema", "models"},
    "config": {"annotation", "errors", "io", "models", "stage"},
    "outputs": {"annotation", "errors", "io", "schema"},
    "testing": {"annotation", "models", "schema"},
    "engine": {"annotation", "config", "errors", "io", "models", "outputs", "schema", "stage", "testing"},
    "cli": {"engine", "io", "outputs", "testing", "config", "errors"},
}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: pathlib.Path, known: dict) -> set[str]:
    """The sculpt modules a file imports, at any depth of the file (lazy imports count)."""
    def resolve(name):
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sculpt"):
            found |= {resolve(f"{node.module}.{alias.name}") or resolve(node.module) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names if alias.name.startswith("sculpt")}
    return {name for name in found if name and known[name].name != "__init__.py"}


def part(module: str) -> str:
    return module.split(".")[1]


def test_there_is_no_import_circle():
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    assert len(graph) > 30 and any(graph.values())  # the walk found the package and its imports

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(name for name in graph if name in reach(name))
    assert circles == []


def test_imports_point_one_way():
    known = modules()
    crossings = {(part(name), part(target)) for name, path in known.items() if name != "sculpt"
                 for target in imports_of(path, known) if target != "sculpt" and part(target) != part(name)}
    assert ("engine", "io") in crossings  # the check sees crossings
    wrong = sorted((src, dst) for src, dst in crossings if dst not in ALLOWED[src])
    assert wrong == []


def test_no_module_is_longer_than_a_sitting():
    lengths = {str(path.relative_to(ROOT.parent)): len(path.read_text().splitlines()) for path in ROOT.rglob("*.py")}
    assert lengths["sculpt/engine/job.py"] > 20
    assert {name: n for name, n in lengths.items() if n > 420} == {}
