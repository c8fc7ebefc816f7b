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
