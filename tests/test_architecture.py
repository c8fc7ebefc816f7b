"""The package's import graph: no module imports another's private names, and no import cycle
(function-level imports included), so layers stay layers."""

import ast
from pathlib import Path

import adapterkit

PACKAGE = Path(adapterkit.__file__).parent


def module_name(path: Path) -> str:
    parts = ("adapterkit", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, at any depth."""
    here = module_name(path)
    package = here if is_package(path) else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names in imports(path):
            if target not in MODULES:
                continue
            for imported in names:  # `from .methods import lora` imports a submodule
                submodule = f"{target}.{imported}"
                edges[name].add(submodule if submodule in MODULES else target)
            if not names:
                edges[name].add(target)
    for name in edges:
        edges[name].discard(name)
    return edges


def test_no_module_imports_a_private_name_of_another():
    offenders = [
        f"{name} imports {imported} from {target}"
        for name, path in MODULES.items()
        for target, names in imports(path)
        if target.startswith("adapterkit") and target != name
        for imported in names
        if imported.startswith("_")
    ]
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    edges = internal_edges()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_is_really_read():
    """The checks above would pass on an empty graph: make sure they see the real imports."""
    edges = internal_edges()
    assert "adapterkit.hooks" in edges["adapterkit.model"]
    assert "adapterkit.methods" in edges["adapterkit.hooks"]
    assert "adapterkit.methods.base" in edges["adapterkit.methods.ia3"]


# ---- method names live in methods/ -------------------------------------------------------------------
METHODS_DIR = PACKAGE / "methods"
# String literals outside methods/ that equal a method's name but are words of a message, not a
# choice made by method: compose.py calls a Fuse block's own name a "fusion" name in its errors.
PROSE = {("adapterkit.compose", "fusion")}


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant in the file but docstrings; comments are not in the
    syntax tree, and an f-string's text parts are never a bare name."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.add(id(first.value))
    return [
        (node.lineno, node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def method_names() -> set[str]:
    from adapterkit.methods import registered_methods

    return {method.name for method in registered_methods()}


def test_no_module_outside_methods_names_a_method():
    """What differs by method comes from the registry: a quoted method name elsewhere is a special
    case that a new method would not get."""
    names = method_names()
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} names {value!r}"
        for module, path in MODULES.items()
        if METHODS_DIR not in path.parents
        for line, value in string_literals(path)
        if value in names and (module, value) not in PROSE
    ]
    assert offenders == []


def test_the_method_name_check_really_reads_the_files(tmp_path):
    names = method_names()
    assert {"bottleneck", "lora", "adalora", "ia3", "vera", "fusion"} <= names
    for name in ("lora", "ia3", "vera"):
        assert name in {value for _, value in string_literals(METHODS_DIR / f"{name}.py")}
    for module, value in PROSE:  # an entry that no longer applies goes
        assert value in {found for _, found in string_literals(MODULES[module])}
    sample = tmp_path / "sample.py"
    sample.write_text('"""lora"""\n\n\ndef f():\n    """ia3"""\n    return "vera", f"{f} lora"  # "bottleneck"\n')
    assert [value for _, value in string_literals(sample)] == ["vera", " lora"]
