"""The wiring is a DAG: no import cycle among embedding_server's and embedding_client's modules.

Imports inside functions count too (a late import that dodges a cycle is still a cycle in the
design); imports under ``if TYPE_CHECKING:`` do not, since they never run. The checker is
tested on a package with a cycle built here, so that a broken checker cannot pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (ROOT / "server" / "embedding_server", ROOT / "client" / "embedding_client")
GENERATED = "embedding_client.proto"  # protoc's output: imports only protobuf and itself


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module under ``package_dir`` (``__init__`` as the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at any depth, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of ours it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # the longest prefix that is one of our modules: ``a.b.func`` → ``a.b``
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def our_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        modules.update(module_files(package))
    modules = {name: path for name, path in modules.items() if not name.startswith(GENERATED + ".")}
    return import_graph(modules)


def layers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between top-level units (``embedding_server.engine.batcher`` counts as ``...engine``)."""

    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    collapsed: dict[str, set[str]] = {}
    for source, targets in graph.items():
        collapsed.setdefault(unit(source), set()).update(unit(t) for t in targets if unit(t) != unit(source))
    return collapsed


def test_no_import_cycle_between_modules() -> None:
    graph = our_graph()
    assert graph["embedding_server.app"], "the checker saw no import in app.py"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_no_import_cycle_between_packages() -> None:
    """engine, models, grpc_api, rest, ... form layers: none imports one that imports it back."""
    graph = layers(our_graph())
    assert "embedding_server.models" in graph["embedding_server.engine"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between packages: " + " → ".join(cycle or [])


def test_checker_finds_a_cycle(tmp_path: Path) -> None:
    """A cycle through a late import and a relative one is found; the same package without it is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
        "def late():\n    from ..c import thing\n"
    )
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}  # the package's __init__ runs too
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]

    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
    )
    assert find_cycle(import_graph(module_files(pkg))) is None
    assert find_cycle(layers({"pkg.sub.b": {"pkg.c.d"}, "pkg.c.e": {"pkg.sub"}})) == [
        "pkg.c",
        "pkg.sub",
        "pkg.c",
    ]


def test_the_client_never_imports_the_server() -> None:
    """The embedding-client distribution installs without embedding_server (tests/test_install.py);
    Ray's in-process mode finds the server's engine through an entry point, late imports included."""
    graph = our_graph()
    assert graph["embedding_client.ray"], "the checker saw no import in ray.py"
    users = {
        name
        for name, targets in graph.items()
        if name.startswith("embedding_client") and any(t.startswith("embedding_server") for t in targets)
    }
    assert users == set()


def test_the_model_layer_names_no_request_field() -> None:
    """Models state what they cannot take (models/refusals.py); the engine names the field
    (engine/validation.py model_refusals). No module under models/ imports a request error."""
    request_errors = {"InvalidArgument", "Overloaded", "MemoryLimitExceeded", "NotServing"}
    models = ROOT / "server" / "embedding_server" / "models"
    imported = {
        f"{path.name}: {alias.name}"
        for path in sorted(models.rglob("*.py"))
        for node in _runtime_imports(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("errors")
        for alias in node.names
        if alias.name in request_errors
    }
    assert imported == set()
    assert (models / "refusals.py").exists()
