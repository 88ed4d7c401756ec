"""The package's imports run one way: no module of jaxdit/ imports, however indirectly, one that
imports it back. Function-local imports count, since they hide a cycle only until they run.

The graph is read from the source (every `import` and `from ... import` statement anywhere in a
module), not from what Python has loaded, so it costs no imports and sees every code path.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "jaxdit"


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name; a package's name is its __init__.py."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its body.

    `from a.b import c` is an import of a.b.c when that is a module, else of a.b. Importing a.b.c
    also runs the __init__ of a and a.b first, so those packages count too, except the ones
    `name` itself lives in (which Python has run before it, whatever it imports).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    parents = {".".join(module.split(".")[:i]) for module in found for i in range(1, module.count(".") + 1)}
    found |= {parent for parent in parents if not name.startswith(parent + ".")}
    return {module for module in found if module in modules and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_local_and_relative_imports(tmp_path):
    files = ("pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py", "other.py")
    names = ("pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "other")
    modules = dict(zip(names, (tmp_path / f for f in files), strict=True))
    (tmp_path / "pkg/sub").mkdir(parents=True)
    for path in modules.values():
        path.write_text("")
    modules["pkg.a"].write_text("def f():\n    from pkg import b\n")
    modules["pkg.b"].write_text("from . import a\nfrom .a import f\n")
    modules["other"].write_text("import pkg.sub.c as c\n")
    modules["pkg.sub.c"].write_text("from ..a import f\n")
    assert imported_modules("pkg.a", modules["pkg.a"], modules) == {"pkg.b"}
    assert imported_modules("pkg.b", modules["pkg.b"], modules) == {"pkg.a"}
    # Importing a submodule runs its packages' __init__ first; a module's own packages do not count.
    assert imported_modules("other", modules["other"], modules) == {"pkg", "pkg.sub", "pkg.sub.c"}
    assert imported_modules("pkg.sub.c", modules["pkg.sub.c"], modules) == {"pkg.a"}


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"jaxdit.train_step", "jaxdit.codec", "jaxdit.data.pipeline"} <= graph.keys()
    assert "jaxdit.blocks" in graph["jaxdit.model"]  # the walk reads real edges
    found = "\n".join(", ".join(component) for component in cycles(graph))
    assert not found, f"each line is a set of jaxdit modules that import each other, directly or not:\n{found}"
